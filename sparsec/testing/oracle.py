"""An independent float64 oracle of ``sparse_attention``: each head's mask built from its
family's own ``Pattern.mask`` (a dynamic family: ``estimate_indices``
+ ``dynamic_mask``), masked softmax attention in float64, one head at a time. What the fuzz
test holds the reference to and the interpreted kernels to."""
from __future__ import annotations

import torch

from sparsec.patterns import get_pattern


def float64_attention(q, k, v, mask, scale, causal, groups) -> torch.Tensor:
    """Float64 masked softmax attention, head by head; a row with no kept key gives zeros."""
    batch, heads, n_q, _ = q.shape
    n_k, per_kv = k.shape[2], heads // k.shape[1]
    full_mask = None if mask is None else mask.expand(batch, heads, n_q, n_k)
    d = torch.arange(n_q)[:, None] + (n_k - n_q) - torch.arange(n_k)[None, :]
    out = torch.zeros(batch, heads, n_q, v.shape[-1], dtype=torch.float64)
    for group in groups:
        pattern = get_pattern(group.pattern)
        keep_group = None
        if pattern.dynamic:
            index = torch.tensor(group.heads)
            group_mask = None if mask is None or mask.dim() < 3 or mask.shape[-3] == 1 else mask[..., index, :, :]
            group_mask = mask if group_mask is None else group_mask
            estimate = pattern.estimate_indices(group.params, q[:, index], k[:, index // per_kv],
                                                 scale, causal, group_mask)
            keep_group = pattern.dynamic_mask(*estimate, n_q, n_k, causal)
        for position, h in enumerate(group.heads):
            qh, kh, vh = q[:, h].double(), k[:, h // per_kv].double(), v[:, h // per_kv].double()
            scores = qh @ kh.transpose(-1, -2) * scale
            keep = torch.ones(batch, n_q, n_k, dtype=torch.bool)
            if full_mask is not None:
                if full_mask.dtype == torch.bool:
                    keep &= full_mask[:, h]
                else:
                    scores = scores + full_mask[:, h].double()
            if causal:
                keep &= d >= 0
            if pattern.computes_none:
                keep[:] = False
            elif pattern.dynamic:
                keep &= keep_group[:, position]
            elif not pattern.computes_all:
                keep &= pattern.mask(group.params, n_q, n_k, causal)
            scores = scores.masked_fill(~keep, float("-inf"))
            probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
            out[:, h] = probs @ vh
    return out
