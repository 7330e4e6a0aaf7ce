"""Dynamic vertical + slash pattern (MInference, Jiang et al. 2024, section 3.2).

params: ``vertical`` (Elastic, how many key columns), ``slash`` (Elastic, how many
diagonals) and ``last_q`` (how many of the last queries estimate them).

Per input, batch and head, the last ``last_q`` queries attend to all keys; the columns
and diagonals with the largest summed attention are kept. Column 0 (the sink) and the
main diagonal are always kept, as MInference forces its first columns and last slashes.

Costs and recalls are estimates, as the pattern is chosen per input: the pair count is an
upper bound (each column and diagonal holds at most ``N`` pairs), the cost adds the
estimation's ``last_q x N`` scores, and the fit's recall takes the calibration-average
top columns and diagonals in place of each input's own.
"""
from __future__ import annotations

import sympy
import torch

from sparsec.patterns import fitting
from sparsec.patterns.base import MASKED_ADDITIVE, N, Elastic, Pattern, full_pairs, mask_4d, offsets, register

# Most columns / diagonals a fit considers: an eighth of n_k each (with both at that
# bound the pattern holds half of the causal score matrix), and at most MAX_LINES.
MAX_LINES = 1024


@register
class VerticalSlash(Pattern):
    kind = "vertical_slash"
    dynamic = True
    elastic_params = frozenset({"vertical", "slash"})
    # Lookup-table template, KEEP_KIND 2: estimated column and offset maps, gathered columns.
    triton_template = "lut"
    triton_flags = {"KEEP_KIND": 2, "HAS_COLUMNS": True}

    def merge(self, first, second):
        """More columns and diagonals from the same estimate (same ``last_q``): the top
        ``k + 1`` hold the top ``k``."""
        if first.get("last_q", 64) != second.get("last_q", 64):
            return None
        return {**first, "vertical": Elastic.widest(first["vertical"], second["vertical"]),
                "slash": Elastic.widest(first["slash"], second["slash"])}

    def index_keep(self, params, i, j, d, ops):
        raise TypeError("vertical_slash is dynamic: use estimate_indices() and dynamic_mask()")

    def block_classes(self, params, n_q, n_k, causal, block_m, block_n, device="cpu"):
        raise TypeError("vertical_slash has no static block layout; it is estimated per input")

    def estimating_queries(self, params: dict, n_q: int) -> int:
        """How many of the last queries the estimate reads."""
        return max(1, min(int(params.get("last_q", 64)), n_q))

    def estimate_indices(self, params: dict, q: torch.Tensor, k: torch.Tensor, scale: float,
                         causal: bool, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Key columns ``[B, H, V]`` and diagonal offsets ``[B, H, S]`` to keep, sorted.

        ``q`` is ``[B, H, n_q, D]``, ``k`` is ``[B, H, n_k, D]`` (K heads already matched to
        query heads). ``mask`` is the site's user mask (boolean, True = attend, or additive),
        broadcastable to ``[B, H, n_q, n_k]`` or to the last queries' ``[B, H, last_q, n_k]``:
        the estimate scores what attention will compute, so keys the mask removes get no
        mass, and columns / diagonals the mask removes for every estimating query rank last
        (picked only when fewer unmasked ones exist than asked for). Column 0 and offset 0
        are always among them unless the mask removes them there.
        """
        n_q, n_k = q.shape[-2], k.shape[-2]
        last_q = self.estimating_queries(params, n_q)
        rows = torch.arange(n_q - last_q, n_q, device=q.device)
        cols = torch.arange(n_k, device=q.device)
        d = offsets(rows, cols, n_q, n_k)
        scores = (q[..., -last_q:, :].float() @ k.float().transpose(-1, -2)) * scale
        if causal:
            scores = scores.masked_fill(d < 0, float("-inf"))
        allowed = None
        if mask is not None:
            mask = _last_rows(mask, last_q)
            if mask.dtype == torch.bool:
                allowed = mask
            else:
                scores = scores + mask.float()
                allowed = mask > MASKED_ADDITIVE
            allowed = (allowed & (d >= 0) if causal else allowed).expand_as(scores)
            scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)        # a fully masked row: no mass
        column_score = probs.sum(dim=-2)                               # [B, H, n_k]
        # Slash scores: attention summed along each offset d in [-shift, n_k-1]. The estimating
        # queries see offsets down to 1 - last_q, below -(n_k-1) when they outnumber the keys
        # (cross-attention).
        shift = _slash_shift(last_q, n_k)
        span = shift + n_k
        batch_heads = probs.shape[:-2]
        slash_score = torch.zeros(*batch_heads, span, device=q.device)
        index = (d + shift).expand_as(probs).reshape(*batch_heads, -1)
        slash_score.scatter_add_(-1, index, probs.reshape(*batch_heads, -1))
        if causal:
            slash_score[..., :shift] = float("-inf")                # offsets above the diagonal
        # Forced: the sink column and the main diagonal (MInference) ...
        column_score[..., 0] = float("inf")
        slash_score[..., shift] = float("inf")
        if allowed is not None:
            # ... unless the mask removes them: keys and offsets the mask removes for every
            # estimating query rank last.
            slash_open = torch.zeros(*batch_heads, span, dtype=torch.int8, device=q.device)
            slash_open.scatter_reduce_(-1, index, allowed.reshape(*batch_heads, -1).to(torch.int8), "amax")
            column_score = column_score.masked_fill(~allowed.any(dim=-2), float("-inf"))
            slash_score = slash_score.masked_fill(slash_open == 0, float("-inf"))
        n_vertical = min(Elastic.from_json(params["vertical"]).at(n_k), n_k)
        n_slash = min(Elastic.from_json(params["slash"]).at(n_k), span)
        columns = column_score.topk(n_vertical, dim=-1).indices.sort(dim=-1).values
        diagonals = slash_score.topk(n_slash, dim=-1).indices.sort(dim=-1).values - shift
        return columns, diagonals

    def dynamic_mask(self, columns: torch.Tensor, diagonals: torch.Tensor, n_q: int, n_k: int,
                     causal: bool) -> torch.Tensor:
        """Boolean ``[B, H, n_q, n_k]`` mask from estimated columns and diagonals."""
        device = columns.device
        batch_heads = columns.shape[:-1]
        column_mask = torch.zeros(*batch_heads, n_k, dtype=torch.bool, device=device)
        column_mask.scatter_(-1, columns, True)
        d = offsets(torch.arange(n_q, device=device), torch.arange(n_k, device=device), n_q, n_k)
        # Offsets of the score matrix lie in [1 - n_q, n_k - 1]; estimated ones in [-shift, n_k - 1].
        shift = max(n_q, n_k) - 1
        offset_mask = torch.zeros(*batch_heads, shift + n_k, dtype=torch.bool, device=device)
        offset_mask.scatter_(-1, diagonals + shift, True)
        slash = offset_mask[..., d + shift]
        mask = column_mask[..., None, :] | slash
        return mask & (d >= 0) if causal else mask

    def dynamic_mask_mod(self, columns: torch.Tensor, diagonals: torch.Tensor, n_q: int, n_k: int,
                         causal: bool):
        """FlexAttention's ``mask_mod(b, h, q_idx, kv_idx)`` of estimated columns and diagonals
        (``[B, H, V]`` and ``[B, H, S]``, from :meth:`estimate_indices`)."""
        shift = max(n_q, n_k) - 1
        column_map = torch.zeros(*columns.shape[:2], n_k, dtype=torch.bool, device=columns.device)
        column_map.scatter_(-1, columns, True)
        offset_map = torch.zeros(*columns.shape[:2], shift + n_k, dtype=torch.bool, device=columns.device)
        offset_map.scatter_(-1, diagonals + shift, True)

        def mask_mod(b, h, q_idx, kv_idx):
            d = q_idx + (n_k - n_q) - kv_idx
            kept = column_map[b, h, kv_idx] | offset_map[b, h, d + shift]
            return kept & (d >= 0) if causal else kept
        return mask_mod

    def pairs(self, params, n, causal):
        lines = Elastic.from_json(params["vertical"]).at(n) + Elastic.from_json(params["slash"]).at(n)
        return min(lines * n, full_pairs(n, causal))

    def pairs_expr(self, params, causal):
        lines = Elastic.from_json(params["vertical"]).expr() + Elastic.from_json(params["slash"]).expr()
        return sympy.Min(lines * N, full_pairs(N, causal))

    def overhead_expr(self, params, head_dim):
        """The estimate's scores: the last ``last_q`` queries against every key."""
        return 2 * head_dim * int(params.get("last_q", 64)) * N

    def _recall_table(self, profile, vertical: int, slash: int) -> torch.Tensor:
        """``[vertical, slash]``: estimated recall of the top ``v + 1`` columns and ``s + 1``
        diagonals (column 0 and offset 0 first, then by calibration mass) at ``[v, s]``.

        A column and a diagonal share one pair, whose mass is estimated as the column's
        mass in that offset's ``|d|`` bucket spread evenly over the bucket's offsets."""
        columns = _ranked(profile.column_mass, first=0)[:vertical]
        diagonal_mass = profile.diagonal_mass
        if profile.causal:
            diagonal_mass = torch.where(profile.offsets >= 0, diagonal_mass, -1.0)
        diagonals = _ranked(diagonal_mass, first=profile.n_q - 1)[:slash] - (profile.n_q - 1)
        bucket = fitting.offset_bucket(diagonals.abs())
        lo, hi = fitting.bucket_bounds(profile.column_offset_mass.shape[-1])
        c = columns[:, None]
        inside = fitting.feasible_offsets(profile, c, hi[bucket][None, :]) - fitting.feasible_offsets(
            profile, c, lo[bucket][None, :])
        low, high = fitting.column_offset_range(profile, c)
        has_pair = (diagonals[None, :] >= low) & (diagonals[None, :] <= high)
        shared = profile.column_offset_mass[c, bucket[None, :]] / inside.clamp(min=1) * has_pair
        table = fitting.union_recall(profile.column_mass[columns].cumsum(0)[:, None],
                                     profile.diagonal_mass[diagonals + profile.n_q - 1].cumsum(0)[None, :],
                                     shared.cumsum(0).cumsum(1), profile.total)
        return table.cummax(0).values.cummax(1).values

    def recall(self, profile, params):
        vertical = min(Elastic.from_json(params["vertical"]).at(profile.n_k), profile.n_k)
        slash = min(Elastic.from_json(params["slash"]).at(profile.n_k), profile.n_q + profile.n_k - 1)
        return float(self._recall_table(profile, vertical, slash)[-1, -1])

    def fit(self, profiles, recall):
        """Per length, the fewest columns + diagonals whose estimated recall reaches
        ``recall``; both counts made elastic."""
        vertical, slash = [], []
        for p in profiles:
            lines = min(MAX_LINES, max(1, -(-p.n_k // 8)))
            table = self._recall_table(p, lines, lines)
            meets = table >= recall - 1e-12
            lines = torch.arange(table.shape[0])[:, None] + torch.arange(table.shape[1])[None, :]
            if meets.any():
                flat = int(torch.where(meets, lines, lines.numel()).argmin())
            else:
                flat = int(table.argmax())
            v, s = divmod(flat, table.shape[1])
            vertical.append((p.n_k, v + 1))
            slash.append((p.n_k, s + 1))
        params = {"vertical": fitting.fit_elastic(vertical).to_json(),
                  "slash": fitting.fit_elastic(slash).to_json(), "last_q": 64}
        return params, fitting.worst_recall(self, profiles, params)


def _slash_shift(last_q: int, n_k: int) -> int:
    """Index of offset 0 in the slash scores: they cover offsets ``-shift .. n_k - 1``, which
    holds ``-(n_k - 1) .. n_k - 1`` and every offset the last ``last_q`` queries see."""
    return max(last_q, n_k) - 1


def _last_rows(mask: torch.Tensor, last_q: int) -> torch.Tensor:
    """The mask's rows of the last ``last_q`` queries (a broadcast row dimension stays 1)."""
    mask = mask_4d(mask)
    return mask if mask.shape[-2] == 1 else mask[..., -last_q:, :]


def _ranked(mass: torch.Tensor, first: int) -> torch.Tensor:
    """Indices by descending mass, with ``first`` (always kept) in front."""
    order = mass.argsort(descending=True, stable=True)
    return torch.cat([torch.tensor([first]), order[order != first]])
