"""Pure-torch reference kernels: the oracle every generated kernel is tested against.

``dense_attention`` is exactly what ``F.scaled_dot_product_attention`` computes.
``sparse_attention`` computes, per head group, softmax attention restricted to the
group's pattern mask (and the user mask and causal cut), in fp32, in query chunks so
that peak memory is ``O(heads * chunk * n_k)`` rather than ``O(heads * n_q * n_k)``.
A query row whose every key is masked out returns zeros.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sparsec.patterns import get_pattern
from sparsec.ir.plan import HeadGroup

QUERY_CHUNK = 1024


def dense_attention(q, k, v, mask, scale: float, causal: bool) -> torch.Tensor:
    """``[B, Hq, n_q, D]`` x ``[B, Hkv, n_k, D]`` attention, GQA when ``Hq != Hkv``."""
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def dense_heads(q, k, v, mask, scale: float, causal: bool, heads: torch.Tensor) -> torch.Tensor:
    """Dense attention of the query heads ``heads`` alone: ``[B, len(heads), n_q, D]``."""
    return dense_attention(*_heads_inputs(q, k, v, mask, heads), scale, causal)


def _heads_inputs(q, k, v, mask, heads: torch.Tensor) -> tuple:
    """``q``, ``k``, ``v`` and ``mask`` of the query heads ``heads`` (and their KV heads)."""
    kv_heads = heads // (q.shape[1] // k.shape[1])
    return q.index_select(1, heads), k.index_select(1, kv_heads), v.index_select(1, kv_heads), _heads_of(mask, heads)


def _heads_of(tensor: torch.Tensor | None, heads: torch.Tensor) -> torch.Tensor | None:
    """Select query heads from a mask broadcastable to ``[B, H, n_q, n_k]``."""
    if tensor is None or tensor.dim() < 3 or tensor.shape[-3] == 1:
        return tensor
    return tensor.index_select(tensor.dim() - 3, heads.to(tensor.device))


def _as_additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if mask is None or mask.dtype != torch.bool:
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


def _pattern_group(q, k, v, mask, scale, causal, group: HeadGroup) -> torch.Tensor:
    pattern = get_pattern(group.pattern)
    n_q, n_k = q.shape[-2], k.shape[-2]
    out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=torch.float32, device=q.device)
    if pattern.dynamic:
        estimate = pattern.estimate_indices(group.params, q, k, scale, causal, mask)
    additive = _as_additive(mask, torch.float32)
    for start in range(0, n_q, QUERY_CHUNK):
        rows = torch.arange(start, min(start + QUERY_CHUNK, n_q), device=q.device)
        if pattern.dynamic:
            keep = pattern.dynamic_mask(*estimate, n_q, n_k, causal, rows=rows)
        else:
            keep = pattern.mask(group.params, n_q, n_k, causal, rows=rows)
        scores = (q[..., rows, :].float() @ k.float().transpose(-1, -2)) * scale
        if additive is not None:
            scores = scores + (additive if additive.shape[-2] == 1 else additive[..., rows, :])
        scores = scores.masked_fill(~keep, float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)      # empty rows give 0, not NaN
        out[..., rows, :] = probs @ v.float()
    return out


def sparse_attention(q, k, v, mask, scale: float, causal: bool, groups: list[HeadGroup]) -> torch.Tensor:
    """Attention where each head group follows its pattern; see the module docstring."""
    out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype, device=q.device)
    for group in groups:
        heads = torch.tensor(group.heads, dtype=torch.long, device=q.device)
        q_g, k_g, v_g, mask_g = _heads_inputs(q, k, v, mask, heads)
        family = get_pattern(group.pattern)
        if family.computes_all:
            result = dense_attention(q_g, k_g, v_g, mask_g, scale, causal)
        elif family.computes_none:
            result = torch.zeros_like(q_g[..., : v.shape[-1]])
        else:
            result = _pattern_group(q_g, k_g, v_g, mask_g, scale, causal, group)
        out.index_copy_(1, heads, result.to(q.dtype))
    return out
