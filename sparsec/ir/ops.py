"""sparsec's custom ops (``torch.ops.sparsec.*``), with fake kernels so graphs that call
them stay exportable, and reference implementations in pure torch.

- ``sparsec::attention(q, k, v, mask, scale, causal)``: the canonical form every
  recognised attention is rewritten to. ``q`` is ``[B, Hq, n_q, D]``, ``k``/``v`` are
  ``[B, Hkv, n_k, D]`` with ``Hq`` a multiple of ``Hkv`` (GQA without repeated K/V);
  ``mask`` is ``None``, boolean (True = attend) or additive, broadcastable to
  ``[B, Hq, n_q, n_k]``.
- ``sparsec::sparse_attention(q, k, v, mask, scale, causal, groups)``: the same, where
  ``groups`` is a JSON group table (:func:`sparsec.ir.plan.encode_groups`) giving each head
  group's pattern and parameters.

The bodies here are the pure-torch reference, the default on every device;
:mod:`sparsec.runtime.device_kernels` registers the faster kernels per device type
(block-sparse on CPU, Triton / FlashAttention-4 on CUDA) when ``sparsec`` is imported.
"""
from __future__ import annotations

from typing import Optional

import torch

from sparsec.ir.errors import UnservableInputError, UnsupportedDtypeError
from sparsec.ir.plan import decoded_groups
from sparsec.ir import reference

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise a typed error for inputs no attention kernel can serve."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in SUPPORTED_DTYPES:
            raise UnsupportedDtypeError(
                f"attention input {name} has dtype {t.dtype}; sparsec attention runs on "
                "float16, bfloat16 or float32 — cast the model with .to(torch.bfloat16) (or float32)")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention expects 4-d [B, H, N, D] q/k/v, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} key/value heads")


def dense_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                       scale: float, causal: bool) -> torch.Tensor:
    """``sparsec::attention`` on every device (also called directly, without the dispatcher,
    by a compiled model's runner: :mod:`sparsec.runtime.fast_graph`)."""
    check_attention_inputs(q, k, v)
    # Contiguous, as the fake kernel says: SDPA's own output layout depends on the backend it
    # picks (flash gives [B, N, H, D] memory for transposed inputs), which a fake cannot know,
    # and torch.compile checks the strides.
    return reference.dense_attention(q, k, v, mask, scale, causal).contiguous()


@torch.library.custom_op("sparsec::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
              scale: float, causal: bool) -> torch.Tensor:
    return dense_attention_op(q, k, v, mask, scale, causal)


@attention.register_fake
def _attention_fake(q, k, v, mask, scale, causal):
    return q.new_empty(q.shape[:-1] + (v.shape[-1],))


def check_causal_alignment(q: torch.Tensor, k: torch.Tensor, causal: bool) -> None:
    """``causal`` follows SDPA's ``is_causal`` (top-left aligned) while patterns are aligned
    bottom-right; the two agree only for square attention, so refuse the rest."""
    if causal and q.shape[-2] != k.shape[-2]:
        raise UnservableInputError(
            f"sparse causal attention with {q.shape[-2]} queries and {k.shape[-2]} keys: is_causal "
            "(top-left) and the patterns (bottom-right) disagree unless the lengths are equal; "
            "serve prefill with equal lengths, or pass an explicit mask instead of is_causal")


@torch.library.custom_op("sparsec::sparse_attention", mutates_args=())
def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                     scale: float, causal: bool, groups: str) -> torch.Tensor:
    check_attention_inputs(q, k, v)
    check_causal_alignment(q, k, causal)
    return reference.sparse_attention(q, k, v, mask, scale, causal, decoded_groups(groups))


@sparse_attention.register_fake
def _sparse_attention_fake(q, k, v, mask, scale, causal, groups):
    return q.new_empty(q.shape[:-1] + (v.shape[-1],))
