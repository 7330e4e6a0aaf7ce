"""Block-sparse attention on the CPU: the kernel behind onnxruntime's ``SparseAttention``.

Only the key blocks a pattern keeps are computed. For each query block the kept key
blocks are gathered (padded to the row with most blocks), scored with one batched matmul,
masked exactly at token level inside partial blocks, soft-maxed and multiplied with the
gathered values — the gathered-block form of block-sparse FlashAttention / BigBird.
Static layouts are derived from the pattern's mask (``sparsec.patterns``) at the length
being served and cached; ``vertical_slash`` estimates its layout per input. The result
equals ``sparsec.ir.reference.sparse_attention`` for one head group.
"""
from __future__ import annotations

import functools
import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from sparsec.patterns import get_pattern
from sparsec.patterns.base import mask_4d, positions
from sparsec.ir import reference

# Elements of one chunk's score tensor: bounds peak memory and keeps chunks cache-sized.
_CHUNK_ELEMENTS = 1 << 20
_MASK_ROWS = 1024


@dataclass
class GatherPlan:
    """Which key blocks each query block reads, and the exact mask inside them."""

    block: int
    index: torch.Tensor        # [query blocks, kept] key block ids, padding slots included
    mask_bias: torch.Tensor    # [Bm, Hm, query blocks, block, kept * block]: 0 kept, -inf not
    counts: torch.Tensor       # [query blocks]: kept key blocks of each (its first index slots)
    key_blocks: int            # key blocks at this length

    @property
    def gathered_fraction(self) -> float:
        """Fraction of the score matrix's blocks that are computed (padding slots included)."""
        return self.index.shape[1] / self.key_blocks


def _pad(x: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    extra = size - x.shape[dim]
    if extra == 0:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def gather_blocks(x: torch.Tensor, index: torch.Tensor, block: int) -> torch.Tensor:
    """``x[..., R, Nk]`` (``R`` is 1 or ``Nq``) at the gathered key blocks:
    ``[..., query blocks, R == 1 ? 1 : block, kept * block]``."""
    *lead, rows, n_k = x.shape
    nbq, kept = index.shape
    nbk = math.ceil(n_k / block)
    x = _pad(x, -1, nbk * block).reshape(*lead, rows, nbk, block)
    if rows == 1:
        out = x[..., 0, :, :][..., index, :]                        # [..., nbq, kept, block]
        return out.reshape(*lead, nbq, 1, kept * block)
    x = _pad(x, -3, nbq * block).reshape(*lead, nbq, block, nbk, block)
    out = x[..., torch.arange(nbq)[:, None], :, index, :]           # [nbq, kept, ..., block, block]
    dims = len(lead)
    out = out.permute(*range(2, 2 + dims), 0, 2 + dims, 1, 3 + dims)
    return out.reshape(*lead, nbq, block, kept * block)


def gather_plan(mask: torch.Tensor, block: int) -> GatherPlan:
    """The gather plan of a boolean ``[Bm, Hm, Nq, Nk]`` mask: the union layout over batch
    and heads, each query block padded to the row with most kept key blocks."""
    *_, n_q, n_k = mask.shape
    nbq, nbk = math.ceil(n_q / block), math.ceil(n_k / block)
    padded = _pad(_pad(mask, -2, nbq * block), -1, nbk * block)
    layout = padded.reshape(-1, nbq, block, nbk, block).any(dim=4).any(dim=2).any(dim=0)
    counts = layout.sum(dim=1)
    kept = max(1, int(counts.max()))
    # Kept blocks first, in key order (stable sort); padding slots point at a real block
    # and are masked out below, so no key is counted twice.
    index = torch.argsort((~layout).to(torch.int8), dim=1, stable=True)[:, :kept]
    valid = torch.arange(kept)[None, :] < counts[:, None]            # [nbq, kept]
    keep = gather_blocks(mask, index, block) & valid.repeat_interleave(block, dim=1)[:, None, :]
    mask_bias = torch.zeros(keep.shape).masked_fill_(~keep, float("-inf"))
    return GatherPlan(block, index, mask_bias, counts.clamp(min=1), nbk)


def _static_mask(kind: str, params: dict, n_q: int, n_k: int, causal: bool) -> torch.Tensor:
    pattern = get_pattern(kind)
    rows = [pattern.mask(params, n_q, n_k, causal, rows=positions(s, min(s + _MASK_ROWS, n_q)))
            for s in range(0, n_q, _MASK_ROWS)]
    return torch.cat(rows)[None, None]


@functools.lru_cache(maxsize=128)
def static_plan(kind: str, params_json: str, n_q: int, n_k: int, causal: bool, block: int) -> GatherPlan:
    """The cached gather plan of a static pattern at one length."""
    return gather_plan(_static_mask(kind, json.loads(params_json), n_q, n_k, causal), block)


def _per_kv(x: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``[A, Hx, nbq, r, K]`` with ``Hx`` 1 or ``Hq`` as ``[A, Hkv|1, nbq, 1|g, r, K]``."""
    a, heads, *rest = x.shape
    if heads == 1:
        return x[:, :, :, None]
    return x.reshape(a, num_kv_heads, heads // num_kv_heads, *rest).transpose(2, 3)


@functools.lru_cache(maxsize=4)
def _worker_pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers, thread_name_prefix="sparsec-attention")


def block_sparse_attention(q, k, v, bias, scale: float, plan: GatherPlan, workers: int = 1) -> torch.Tensor:
    """Attention over the plan's gathered key blocks, fp32 inside, ``q``'s dtype out.

    ``q`` ``[B, Hq, Nq, D]``, ``k``/``v`` ``[B, Hkv, Nk, D]`` (GQA: gathered K/V blocks are
    shared by a key/value head's query heads), ``bias`` additive, broadcastable to
    ``[B, Hq, Nq, Nk]`` and rank 4, or None. Chunks of query blocks run on ``workers``
    threads, each with one torch thread (threads that sleep when idle, where an OpenMP
    team spins and starves the onnxruntime ops around this one).
    """
    batch, num_heads, n_q, head_dim = q.shape
    num_kv_heads, n_k = k.shape[1], k.shape[2]
    per_kv, block = num_heads // num_kv_heads, plan.block
    nbq, kept = plan.index.shape
    nbk = math.ceil(n_k / block)
    # The scale is folded into q (Nq x D multiplies instead of Nq x kept keys).
    qb = _pad(q.float() * scale, 2, nbq * block).reshape(batch, num_kv_heads, per_kv, nbq, block, head_dim)
    qb = qb.permute(0, 1, 3, 2, 4, 5)                               # [B, Hkv, nbq, g, block, D]
    kb = _pad(k.float(), 2, nbk * block).reshape(batch, num_kv_heads, nbk, block, head_dim)
    vb = _pad(v.float(), 2, nbk * block).reshape(batch, num_kv_heads, nbk, block, v.shape[-1])
    bias_blocks = None
    if bias is not None:
        bias_blocks = _per_kv(gather_blocks(bias.float(), plan.index, block), num_kv_heads)
    mask_blocks = _per_kv(plan.mask_bias, num_kv_heads)
    out = torch.empty(batch, num_kv_heads, nbq, per_kv, block, v.shape[-1], dtype=torch.float32)
    step = max(1, _CHUNK_ELEMENTS // (batch * num_heads * block * kept * block))

    def attend_chunk(start: int) -> None:
        blocks = slice(start, min(start + step, nbq))
        # Causal rows keep more blocks further down: gather only this chunk's most.
        chunk_kept = int(plan.counts[blocks].max())
        index = plan.index[blocks, :chunk_kept]
        keys = slice(0, chunk_kept * block)
        # -- gather the kept key / value blocks of these query blocks --
        k_kept = kb[:, :, index].flatten(3, 4)                       # [B, Hkv, c, kept*block, D]
        v_kept = vb[:, :, index].flatten(3, 4)
        # -- compute qk, masked in place --
        scores = qb[:, :, blocks].flatten(3, 4) @ k_kept.transpose(-1, -2)
        scores = scores.unflatten(3, (per_kv, block))               # [B, Hkv, c, g, block, K]
        if bias_blocks is not None:
            scores += bias_blocks[:, :, blocks, :, :, keys]
        scores += mask_blocks[:, :, blocks, :, :, keys]
        probs = torch.softmax(scores, dim=-1)
        if bias_blocks is not None:
            probs.nan_to_num_(0.0)        # rows the user mask empties give 0, not NaN
        # -- multiply with v --
        out[:, :, blocks] = (probs.flatten(3, 4) @ v_kept).unflatten(3, (per_kv, block))

    def attend_chunk_in_worker(start: int) -> None:
        torch.set_num_threads(1)
        attend_chunk(start)

    starts = range(0, nbq, step)
    if workers > 1 and len(starts) > 1:
        list(_worker_pool(workers).map(attend_chunk_in_worker, starts))
    else:
        for start in starts:
            attend_chunk(start)
    # epilogue: back to [B, Hq, Nq, Dv]; padded query rows (NaN without a kept key) dropped
    out = out.permute(0, 1, 3, 2, 4, 5).reshape(batch, num_heads, nbq * block, v.shape[-1])
    return out[:, :, :n_q].to(q.dtype)


def group_attention(q, k, v, bias, scale: float, causal: bool, pattern: str, params: dict,
                    block: int, workers: int = 1) -> torch.Tensor:
    """One head group's attention: block-sparse for sparse patterns, SDPA for ``dense``."""
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
    n_q, n_k = q.shape[2], k.shape[2]
    if family.dynamic:
        per_kv = q.shape[1] // k.shape[1]
        k_heads = k.repeat_interleave(per_kv, dim=1)
        columns, diagonals = family.estimate_indices(params, q, k_heads, scale, causal, bias)
        plan = gather_plan(family.dynamic_mask(columns, diagonals, n_q, n_k, causal), block)
    else:
        plan = static_plan(pattern, json.dumps(params, sort_keys=True), n_q, n_k, causal, block)
    return block_sparse_attention(q, k, v, bias, scale, plan, workers)


# -- CPU execution of ``sparsec::sparse_attention`` ------------------------------------------

# Key block of the CPU path: the ``cpu`` target's block size (sparsec/targets.py), which its
# cost constants were measured at (sparsec/cost_model.py).
CPU_BLOCK = 64


def _group_kv_heads(heads: list[int], per_kv: int) -> list[int] | None:
    """The key/value heads of a group whose query heads are whole GQA groups in order (so
    each gathered K/V block serves ``per_kv`` query heads); None otherwise."""
    kv_heads = sorted({head // per_kv for head in heads})
    if heads != [kv * per_kv + j for kv in kv_heads for j in range(per_kv)]:
        return None
    return kv_heads


def _group_bias(mask: torch.Tensor | None, heads: torch.Tensor, batch: slice) -> torch.Tensor | None:
    """One piece's user mask as an fp32 additive bias of rank 4 (what ``group_attention`` takes)."""
    if mask is None:
        return None
    mask = mask_4d(mask)
    mask = mask if mask.shape[0] == 1 else mask[batch]
    return reference._as_additive(reference._heads_of(mask, heads), torch.float32)


def _pieces(batch: int, kv_heads: list[int], workers: int) -> list[tuple[slice, list[int]]]:
    """(batch slice, kv heads) pieces of a group, at least ``workers`` of them where possible."""
    parts = max(1, min(len(kv_heads), math.ceil(workers / batch)))
    size = math.ceil(len(kv_heads) / parts)
    return [(slice(b, b + 1), kv_heads[start:start + size])
            for b in range(batch) for start in range(0, len(kv_heads), size)]


def sparse_attention(q, k, v, mask, scale: float, causal: bool, groups: list, block: int = CPU_BLOCK,
                     workers: int | None = None) -> torch.Tensor:
    """``sparsec::sparse_attention`` for CPU tensors: each sparse head group through
    :func:`group_attention`, which computes only the key blocks its pattern keeps; dense
    groups run SDPA exactly as the reference does. Equal to
    :func:`sparsec.ir.reference.sparse_attention` (the oracle) up to float rounding.

    A sparse group is cut into pieces (one sequence, some key/value heads with their query
    heads; K/V are not repeated) run on ``workers`` single-threaded workers (default:
    torch's thread count). The path is many small ops, and an OpenMP team per op costs more
    than the op on a busy machine (measured: 0.13 s vs 0.009 s for a window-32 group at
    N = 512 on two loaded cores)."""
    workers = torch.get_num_threads() if workers is None else workers
    batch, num_heads, num_kv_heads = q.shape[0], q.shape[1], k.shape[1]
    per_kv = num_heads // num_kv_heads
    out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype, device=q.device)
    tasks = []
    for group in groups:
        heads = torch.tensor(group.heads, dtype=torch.long)
        if get_pattern(group.pattern).computes_all:
            # exactly the reference's dense path (SDPA takes the mask as given)
            kv_index = heads // per_kv
            result = reference.dense_attention(q.index_select(1, heads), k.index_select(1, kv_index),
                                               v.index_select(1, kv_index), reference._heads_of(mask, heads),
                                               scale, causal)
            out.index_copy_(1, heads, result.to(q.dtype))
            continue
        kv_heads = _group_kv_heads(list(group.heads), per_kv)
        if kv_heads is None:       # heads of partial GQA groups: one (repeated) K/V head each
            units = [([head], [head // per_kv]) for head in group.heads]
        else:
            units = [([kv * per_kv + j for j in range(per_kv)], [kv]) for kv in kv_heads]
        for rows, unit_range in _pieces(batch, list(range(len(units))), workers):
            unit_heads = [h for u in unit_range for h in units[u][0]]
            unit_kv = [h for u in unit_range for h in units[u][1]]
            tasks.append((group, rows, torch.tensor(unit_heads), torch.tensor(unit_kv)))

    @torch.no_grad()        # grad mode is per thread: workers would otherwise record autograd
    def attend(task) -> None:
        group, rows, heads, kv_index = task
        q_p = q[rows].index_select(1, heads)
        k_p, v_p = k[rows].index_select(1, kv_index), v[rows].index_select(1, kv_index)
        result = group_attention(q_p, k_p, v_p, _group_bias(mask, heads, rows), scale, causal,
                                 group.pattern, group.params, block)
        out[rows].index_copy_(1, heads, result.to(q.dtype))      # disjoint heads per task

    def attend_in_worker(task) -> None:
        torch.set_num_threads(1)
        attend(task)

    if workers > 1 and tasks:      # even one task: a single-threaded worker beats an OpenMP team here
        list(_worker_pool(workers).map(attend_in_worker, tasks))
    else:
        for task in tasks:
            attend(task)
    return out
