"""Sparse attention on the CPU: the compiled model's CPU path and the kernel behind
onnxruntime's ``SparseAttention``.

Queries run in chunks of ``rows``. Each chunk gathers only the keys some row of it keeps (the
union of its rows' kept keys, in key order) and runs PyTorch's fused CPU attention
(``F.scaled_dot_product_attention``) on them, with the pattern's exact mask over the gathered
keys: a causal window of ``w`` at chunk ``R`` reads ``R + w`` keys a row instead of the row's
whole prefix. Static patterns' chunks are derived from the pattern's mask at the length being
served and cached; dynamic families (``vertical_slash``, ``dynamic_blocks``) estimate their
mask per input and gather per chunk. Fp32 inside, the input's dtype out. The result equals
``sparsec.ir.reference.sparse_attention`` for each head group.

Gathered keys per chunk rather than 64 x 64 blocks (the path before, session 10): on two
cores at N = 2048, a one-head sink_window group of window 393 runs 3.1 ms against 7.0 as
blocks and 8.1 dense; three GQA heads 7.1 against 15.7 and 13.1 dense (docs/benchmarks.md).
"""
from __future__ import annotations

import functools
import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sparsec.patterns import get_pattern
from sparsec.patterns.base import TorchOps, mask_4d, positions
from sparsec.ir import reference

# Query rows per chunk of the CPU path: the cost model's ROW_BLOCK, at which the ``cpu``
# target's constants are fitted (sparsec bench cost-model --cpu).
CPU_ROWS = 128


@dataclass
class Chunk:
    """One chunk of query rows: the keys it reads, and which of them each row keeps."""

    start: int
    end: int
    keys: torch.Tensor               # [K] ascending key positions (int64)
    keep: torch.Tensor | None        # bool [..., end - start, K], None: every row keeps every key


@dataclass
class GatherPlan:
    """The chunks of one head group at one length."""

    chunks: list[Chunk]
    n_k: int

    @property
    def gathered_fraction(self) -> float:
        """Fraction of the score matrix the chunks compute."""
        rows = sum(c.end - c.start for c in self.chunks)
        return sum((c.end - c.start) * len(c.keys) for c in self.chunks) / max(rows * self.n_k, 1)


def _chunk_bounds(n_q: int, rows: int):
    """``(start, end)`` of each chunk of ``rows`` query rows."""
    return [(start, min(start + rows, n_q)) for start in range(0, n_q, rows)]


def gathered_chunk(start: int, end: int, keep: torch.Tensor) -> Chunk:
    """The chunk of rows ``start:end`` from their boolean mask ``[..., end - start, n_k]``."""
    keys = keep.reshape(-1, keep.shape[-1]).any(0).nonzero().flatten()
    kept = keep.index_select(-1, keys)
    return Chunk(start, end, keys, None if bool(kept.all()) else kept)


@functools.lru_cache(maxsize=128)
def static_plan(kind: str, params_json: str, n_q: int, n_k: int, causal: bool, rows: int) -> GatherPlan:
    """The cached plan of a static pattern at one length."""
    pattern, params = get_pattern(kind), json.loads(params_json)
    ops = TorchOps(n_q, n_k)           # one set of lookup tables for every chunk (a stripe table: 7 ms each)
    return GatherPlan([gathered_chunk(start, end, pattern.mask(params, n_q, n_k, causal, rows=positions(start, end),
                                                               ops=ops))
                       for start, end in _chunk_bounds(n_q, rows)], n_k)


def dynamic_plan(family, params: dict, q, k, bias, scale: float, causal: bool, rows: int) -> GatherPlan:
    """The plan of a dynamic pattern for these inputs: its estimate, then each chunk's mask
    (``[B, H, rows, n_k]``, per sequence and head)."""
    n_q, n_k = q.shape[2], k.shape[2]
    k_heads = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    estimate = family.estimate_indices(params, q, k_heads, scale, causal, bias)
    return GatherPlan([gathered_chunk(start, end, family.dynamic_mask(*estimate, n_q, n_k, causal,
                                                                       rows=torch.arange(start, end)))
                       for start, end in _chunk_bounds(n_q, rows)], n_k)


@functools.lru_cache(maxsize=4)
def _worker_pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers, thread_name_prefix="sparsec-attention")


def _attend(q, k, v, bias, scale: float, chunk: Chunk) -> torch.Tensor:
    """One chunk's attention, fp32: ``[B, Hq, rows, Dv]``; a row that keeps no key gives 0."""
    if len(chunk.keys) == 0:
        return q.new_zeros(q.shape[0], q.shape[1], chunk.end - chunk.start, v.shape[-1], dtype=torch.float32)
    mask = chunk.keep
    if bias is not None:
        rows = bias if bias.shape[-2] == 1 else bias[..., chunk.start:chunk.end, :]
        gathered = rows.index_select(-1, chunk.keys).float()
        mask = gathered if mask is None else gathered.masked_fill(~mask, float("-inf"))
    out = F.scaled_dot_product_attention(
        q[:, :, chunk.start:chunk.end].float(), k.index_select(2, chunk.keys).float(),
        v.index_select(2, chunk.keys).float(), attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out.nan_to_num_(0.0)


def run_plan(q, k, v, bias, scale: float, plan: GatherPlan, workers: int = 1) -> torch.Tensor:
    """Attention over the plan's chunks, ``q``'s dtype out. ``q`` ``[B, Hq, Nq, D]``, ``k``/``v``
    ``[B, Hkv, Nk, D]`` (GQA when fewer), ``bias`` additive, rank 4, broadcastable to ``[B, Hq,
    Nq, Nk]``, or None. With ``workers > 1`` chunks run on that many threads, each with one torch
    thread (onnxruntime's op: threads that sleep when idle, where an OpenMP team spins and
    starves the onnxruntime ops around this one); with one, in turn on torch's own threads."""
    out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype)

    def attend(chunk: Chunk) -> None:
        out[:, :, chunk.start:chunk.end] = _attend(q, k, v, bias, scale, chunk)

    @torch.no_grad()         # grad mode is per thread
    def attend_in_worker(part: list[Chunk]) -> None:
        torch.set_num_threads(1)
        for chunk in part:
            attend(chunk)

    if workers > 1 and len(plan.chunks) > 1:
        size = math.ceil(len(plan.chunks) / workers)
        list(_worker_pool(workers).map(attend_in_worker, [plan.chunks[i:i + size]
                                                          for i in range(0, len(plan.chunks), size)]))
    else:
        for chunk in plan.chunks:
            attend(chunk)
    return out


def group_attention(q, k, v, bias, scale: float, causal: bool, pattern: str, params: dict,
                    rows: int = CPU_ROWS, workers: int = 1) -> torch.Tensor:
    """One head group's attention: gathered keys for sparse patterns, SDPA for ``dense``."""
    family = get_pattern(pattern)
    if family.computes_none:
        return q.new_zeros(q.shape[:-1] + (v.shape[-1],))
    if family.computes_all:
        if bias is not None and causal:
            # SDPA takes a mask or is_causal, not both: fold the (top-left) triangle in.
            n_q, n_k = q.shape[2], k.shape[2]
            triangle = torch.ones(n_q, n_k, dtype=torch.bool).tril()
            bias, causal = bias.masked_fill(~triangle, float("-inf")), False
        return reference.dense_attention(q, k, v, bias, scale, causal)
    if family.dynamic:
        plan = dynamic_plan(family, params, q, k, bias, scale, causal, rows)
    else:
        plan = static_plan(pattern, json.dumps(params, sort_keys=True), q.shape[2], k.shape[2], causal, rows)
    return run_plan(q, k, v, bias, scale, plan, workers)


# -- CPU execution of ``sparsec::sparse_attention`` ------------------------------------------

def _group_kv(heads: list[int], per_kv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(query heads, key/value heads)`` indices of a group: its whole GQA groups share their
    key/value heads (GQA kept); a group that splits one repeats a key/value head per query head."""
    kv_heads = sorted({head // per_kv for head in heads})
    if heads == [kv * per_kv + j for kv in kv_heads for j in range(per_kv)]:
        return torch.tensor(heads), torch.tensor(kv_heads)
    return torch.tensor(heads), torch.tensor(heads) // per_kv


def sparse_attention(q, k, v, mask, scale: float, causal: bool, groups: list, rows: int = CPU_ROWS,
                     workers: int = 1) -> torch.Tensor:
    """``sparsec::sparse_attention`` for CPU tensors: each sparse head group through
    :func:`group_attention`, dense groups through SDPA exactly as the reference does. Equal to
    :func:`sparsec.ir.reference.sparse_attention` (the oracle) up to float rounding.

    One worker by default: each chunk's SDPA splits over torch's own threads, which beat
    single-threaded workers taking chunks in turn (two cores, N = 2048, three GQA heads of a
    window 393: 8.2 ms against 12.9)."""
    per_kv = q.shape[1] // k.shape[1]
    mask = mask_4d(mask)
    out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype, device=q.device)
    with torch.no_grad():        # grad mode is per thread: workers would otherwise record autograd
        for group in groups:
            heads, kv_heads = _group_kv(list(group.heads), per_kv)
            if get_pattern(group.pattern).computes_all:
                # exactly the reference's dense path (SDPA takes the mask as given)
                kv_index = heads // per_kv
                result = reference.dense_attention(q.index_select(1, heads), k.index_select(1, kv_index),
                                                   v.index_select(1, kv_index), reference._heads_of(mask, heads),
                                                   scale, causal)
            else:
                bias = None if mask is None else reference._as_additive(reference._heads_of(mask, heads),
                                                                         torch.float32)
                result = group_attention(q.index_select(1, heads), k.index_select(1, kv_heads),
                                         v.index_select(1, kv_heads), bias, scale, causal, group.pattern,
                                         group.params, rows, workers)
            out.index_copy_(1, heads, result.to(q.dtype))
    return out
