"""Dynamic vertical + slash pattern (MInference, Jiang et al. 2024, section 3.2).

params: ``vertical`` (Elastic, how many key columns), ``slash`` (Elastic, how many
diagonals) and ``queries`` (how many queries estimate them).

Per input, batch and head, ``queries`` queries spread evenly over the sequence (MInference
takes the last ones; see :meth:`VerticalSlash.estimating_rows`) attend to all keys; the
columns and diagonals with the largest summed attention are kept. Column 0 (the sink) and
the main diagonal are always kept, as MInference forces its first columns and last slashes.

Costs and recalls are estimates, as the pattern is chosen per input: the pair count is an
upper bound (each column and diagonal holds at most ``N`` pairs), the cost adds the
estimation's ``queries x N`` scores, and the fit's recall is the mean over calibration
inputs of the mass each input's own lines keep, those lines ranked as its estimate ranks
them (by the mass of its ``fitting.ESTIMATING_QUERIES`` spread queries, which calibration
keeps per input). Ranked by every row's mass instead, the fit counted mass the estimate
misses.
"""
from __future__ import annotations

import sympy
import torch

from sparsec.patterns import fitting
from sparsec.patterns.base import N, Elastic, Pattern, full_pairs, offsets, register
from sparsec.patterns.shared import estimating_probs

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
    # The kernel's offset map spans d in [-(n_k - 1), n_k - 1]: more queries than keys reach below.
    triton_more_queries_than_keys = False

    def merge(self, first, second):
        """More columns and diagonals from the same estimate (same ``queries``): the top
        ``k + 1`` hold the top ``k``."""
        if first.get("queries", fitting.ESTIMATING_QUERIES) != second.get("queries", fitting.ESTIMATING_QUERIES):
            return None
        return {**first, "vertical": Elastic.widest(first["vertical"], second["vertical"]),
                "slash": Elastic.widest(first["slash"], second["slash"])}

    def index_keep(self, params, i, j, d, ops):
        raise TypeError("vertical_slash is dynamic: use estimate_indices() and dynamic_mask()")

    def block_classes(self, params, n_q, n_k, causal, block_m, block_n, device="cpu", keys_in_range_only=False):
        raise TypeError("vertical_slash has no static block layout; it is estimated per input")

    def estimating_queries(self, params: dict, n_q: int) -> int:
        """How many queries the estimate reads."""
        return max(1, min(int(params.get("queries", fitting.ESTIMATING_QUERIES)), n_q))

    def estimating_rows(self, params: dict, n_q: int, device=None) -> torch.Tensor:
        """The positions of the estimating queries: spread evenly over the sequence, the last
        query included. MInference reads the last 64; on SmolLM2 at 8k the columns those pick
        keep 0.57-0.98 of a middle layer's attention mass where 64 spread queries keep
        0.69-0.98 (docs/benchmarks.md, "Spread estimating queries"): which keys matter
        drifts along a long input."""
        return fitting.spread_queries(self.estimating_queries(params, n_q), n_q, torch.device(device or "cpu"))

    def estimate_from_rows(self, params: dict, q_rows: torch.Tensor, rows: torch.Tensor, n_q: int,
                           k: torch.Tensor, scale: float, causal: bool, mask: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """Key columns ``[B, H, V]`` and diagonal offsets ``[B, H, S]`` to keep, sorted, from
        the estimating queries ``q_rows`` at ``rows`` and their rows of the user mask: the
        estimate scores what attention will compute, so keys the mask removes get no mass,
        and columns / diagonals the mask removes for every estimating query rank last (picked
        only when fewer unmasked ones exist than asked for). Column 0 and offset 0 are always
        among them unless the mask removes them there."""
        n_k = k.shape[-2]
        d = offsets(rows, torch.arange(n_k, device=q_rows.device), n_q, n_k)
        probs, allowed = estimating_probs(q_rows, rows, n_q, k, scale, causal, mask)
        column_score = probs.sum(dim=-2)                               # [B, H, n_k]
        # Slash scores: attention summed along each offset d in [-shift, n_k-1], every offset
        # of the score matrix.
        shift = max(n_q, n_k) - 1
        span = shift + n_k
        batch_heads = probs.shape[:-2]
        slash_score = torch.zeros(*batch_heads, span, device=q_rows.device)
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
            slash_open = torch.zeros(*batch_heads, span, dtype=torch.int8, device=q_rows.device)
            slash_open.scatter_reduce_(-1, index, allowed.reshape(*batch_heads, -1).to(torch.int8), "amax")
            column_score = column_score.masked_fill(~allowed.any(dim=-2), float("-inf"))
            slash_score = slash_score.masked_fill(slash_open == 0, float("-inf"))
        n_vertical = min(Elastic.from_json(params["vertical"]).at(n_k), n_k)
        n_slash = min(Elastic.from_json(params["slash"]).at(n_k), span)
        columns = column_score.topk(n_vertical, dim=-1).indices.sort(dim=-1).values
        diagonals = slash_score.topk(n_slash, dim=-1).indices.sort(dim=-1).values - shift
        return columns, diagonals

    def dynamic_mask(self, columns: torch.Tensor, diagonals: torch.Tensor, n_q: int, n_k: int,
                     causal: bool, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Boolean ``[B, H, n_q, n_k]`` mask from estimated columns and diagonals (``[B, H,
        len(rows), n_k]``: the query rows ``rows`` alone)."""
        device = columns.device
        batch_heads = columns.shape[:-1]
        column_mask = torch.zeros(*batch_heads, n_k, dtype=torch.bool, device=device)
        column_mask.scatter_(-1, columns, True)
        rows = torch.arange(n_q, device=device) if rows is None else rows.to(device)
        d = offsets(rows, torch.arange(n_k, device=device), n_q, n_k)
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

    def overhead_expr(self, params, head_dim, causal):
        """The estimate's scores: the estimating queries against every key (all of them,
        causal or not: the estimate computes each row whole)."""
        return 2 * head_dim * int(params.get("queries", fitting.ESTIMATING_QUERIES)) * N

    def _recall_table(self, profile, vertical: int, slash: int) -> torch.Tensor:
        """``[vertical, slash]``: estimated recall of the top ``v + 1`` columns and ``s + 1``
        diagonals (column 0 and offset 0 first, then as the estimate ranks them) at ``[v, s]``:
        the mean over calibration inputs of the mass each input's own lines keep.

        A column and a diagonal share one pair, whose mass is estimated as the column's
        mass in that offset's ``|d|`` bucket spread evenly over the bucket's offsets."""
        tables = [self._input_recall_table(profile, i, vertical, slash)
                  for i in range(profile.input_column_mass.shape[0])
                  if profile.input_column_mass[i].sum() > 0]                # an input whose rows were all masked: none
        return torch.stack(tables).mean(0) if tables else torch.zeros(vertical, slash, dtype=torch.float64)

    def _input_recall_table(self, profile, i: int, vertical: int, slash: int) -> torch.Tensor:
        """:meth:`_recall_table` of calibration input ``i`` alone."""
        estimated_diagonals = profile.input_estimated_diagonals[i]
        if profile.causal:
            estimated_diagonals = torch.where(profile.offsets >= 0, estimated_diagonals, -1.0)
        columns = _ranked(profile.input_estimated_columns[i], first=0)[:vertical]
        diagonals = _ranked(estimated_diagonals, first=profile.n_q - 1)[:slash] - (profile.n_q - 1)
        bucket = fitting.offset_bucket(diagonals.abs())
        lo, hi = fitting.bucket_bounds(profile.column_offset_mass.shape[-1])
        c = columns[:, None]
        inside = fitting.feasible_offsets(profile, c, hi[bucket][None, :]) - fitting.feasible_offsets(
            profile, c, lo[bucket][None, :])
        low, high = fitting.column_offset_range(profile, c)
        has_pair = (diagonals[None, :] >= low) & (diagonals[None, :] <= high)
        column_mass = profile.input_column_mass[i]
        # The column's share of the input's mass in each |d| bucket: the calibration-mean split.
        split = profile.column_offset_mass[c, bucket[None, :]] / profile.column_mass[c].clamp(min=1e-30)
        shared = column_mass[c] * split / inside.clamp(min=1) * has_pair
        table = fitting.union_recall(column_mass[columns].cumsum(0)[:, None],
                                     profile.input_diagonal_mass[i][diagonals + profile.n_q - 1].cumsum(0)[None, :],
                                     shared.cumsum(0).cumsum(1), float(column_mass.sum()))
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
                  "slash": fitting.fit_elastic(slash).to_json(), "queries": fitting.ESTIMATING_QUERIES}
        return params, fitting.worst_recall(self, profiles, params)


def _ranked(mass: torch.Tensor, first: int) -> torch.Tensor:
    """Indices by descending mass, with ``first`` (always kept) in front."""
    order = mass.argsort(descending=True, stable=True)
    return torch.cat([torch.tensor([first]), order[order != first]])
