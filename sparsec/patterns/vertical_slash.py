"""Dynamic vertical + slash pattern (MInference, Jiang et al. 2024, section 3.2).

params: ``vertical`` (Elastic, how many key columns), ``slash`` (Elastic, how many
diagonals) and ``last_q`` (how many of the last queries estimate them).

Per input, batch and head, the last ``last_q`` queries attend to all keys; the columns
and diagonals with the largest summed attention are kept. Column 0 (the sink) and the
main diagonal are always kept, as MInference forces its first columns and last slashes.
"""
from __future__ import annotations

import torch

from .base import Elastic, Pattern, offsets, register


@register
class VerticalSlash(Pattern):
    kind = "vertical_slash"
    dynamic = True

    def keep(self, params, d, rows, cols, n_q, n_k):
        raise TypeError("vertical_slash is dynamic: use estimate_indices() and dynamic_mask()")

    def block_layout(self, params, n_q, n_k, causal, block_m, block_n):
        raise TypeError("vertical_slash has no static block layout; it is estimated per input")

    def estimate_indices(self, params: dict, q: torch.Tensor, k: torch.Tensor, scale: float,
                         causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Key columns ``[B, H, V]`` and diagonal offsets ``[B, H, S]`` to keep, sorted.

        ``q`` is ``[B, H, n_q, D]``, ``k`` is ``[B, H, n_k, D]`` (K heads already matched to
        query heads). Column 0 and offset 0 are always among them.
        """
        n_q, n_k = q.shape[-2], k.shape[-2]
        last_q = min(int(params.get("last_q", 64)), n_q)
        rows = torch.arange(n_q - last_q, n_q, device=q.device)
        cols = torch.arange(n_k, device=q.device)
        d = offsets(rows, cols, n_q, n_k)
        scores = (q[..., -last_q:, :].float() @ k.float().transpose(-1, -2)) * scale
        if causal:
            scores = scores.masked_fill(d < 0, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        column_score = probs.sum(dim=-2)                               # [B, H, n_k]
        # Slash scores: attention summed along each offset d in [-(n_k-1), n_k-1].
        shift = n_k - 1
        slash_score = torch.zeros(*probs.shape[:-2], 2 * n_k - 1, device=q.device)
        index = (d + shift).expand_as(probs).reshape(*probs.shape[:-2], -1)
        slash_score.scatter_add_(-1, index, probs.reshape(*probs.shape[:-2], -1))
        if causal:
            slash_score[..., :shift] = float("-inf")                # offsets above the diagonal
        column_score[..., 0] = float("inf")
        slash_score[..., shift] = float("inf")
        n_vertical = min(Elastic.from_json(params["vertical"]).at(n_k), n_k)
        n_slash = min(Elastic.from_json(params["slash"]).at(n_k), 2 * n_k - 1)
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
        shift = n_k - 1
        offset_mask = torch.zeros(*batch_heads, 2 * n_k - 1, dtype=torch.bool, device=device)
        offset_mask.scatter_(-1, diagonals + shift, True)
        slash = offset_mask[..., (d + shift).clamp(0, 2 * n_k - 2)] & (d.abs() <= shift)
        mask = column_mask[..., None, :] | slash
        return mask & (d >= 0) if causal else mask
