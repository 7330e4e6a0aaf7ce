"""calibrate: run the calibration inputs and measure where every head's attention goes.

The canonical graph runs under :class:`sparsec.analysis.graph_runner.GraphRunner`, which
shows each ``sparsec.attention`` site of the plan its inputs; the pass measures the
attention probabilities of every head (:class:`~sparsec.patterns.fitting.AttentionProfile`:
block-pooled, per key column, per diagonal offset, per column and ``|offset|`` bucket; sink
mass is the first columns'), and the site computes its real output, so later layers see
true activations.

Statistics follow the reference semantics (runtime/reference.py): the user mask (boolean,
True = attend, or additive) and the causal flag, queries aligned bottom-right. Each valid
query row carries mass 1; a row with no attendable key (padding: every key masked, or
additive mask below ``-1e4`` everywhere, the ``finfo.min`` convention) is left out, so
padding does not poison the statistics. Calibration batches of different lengths get
separate profiles (``AttentionStats.profiles[(n_q, n_k)]``), from which fits make sizes
elastic in the length.

A user mask that is exactly the causal mask on every batch makes the head effectively
causal: the site records ``extra["mask_is_causal"] = True`` and its profiles are marked
causal, so classification counts (and later passes can compute) only the lower triangle.

Peak memory: no head's full ``n_q x n_k`` matrix is held. Probabilities are computed for a
chunk of heads and query rows at a time, at most ``chunk_elements`` scores (default 2**22,
16 MiB in fp32; the chunk's scores, probabilities and index tensors take a few times
that), K repeated to the query heads (GQA; the size of q), plus the statistics
themselves (float64): per site and length,
``H * (n_k * (buckets + 1) + n_q + n_k + 2 * inputs * (n_q + 2 * n_k)
+ (1 + 2 * inputs) * ceil(n_q/block) * ceil(n_k/block))`` floats, with
``buckets = log2(max(n_q, n_k)) + 2``.
"""
from __future__ import annotations

import math

import torch

from sparsec.analysis.graph_runner import GraphRunner
from sparsec.passes.infra.pass_manager import CompileContext, PassResult
from sparsec.patterns import get_pattern
from sparsec.patterns.base import MASKED_ADDITIVE, mask_4d, offsets
from sparsec.patterns.fitting import (ESTIMATING_QUERIES, SAMPLED_ROWS, AttentionProfile, AttentionStats,
                                      offset_bucket, offset_buckets, spread_rows)

from sparsec.passes.helpers.attention_sites import ATTENTION

DEFAULT_CHUNK_ELEMENTS = 1 << 22
# Statistics positions kept across sites (they depend on the shape only): 2k tokens need
# about 60 MiB; at longer lengths the first row chunks are kept, the rest recomputed.
INDEX_CACHE_BYTES = 256 << 20
# Per-input line statistics (AttentionProfile's input_<name>): whether each is per key column
# (else per diagonal offset), and whether it is over every row (else the estimating queries).
_LINE_STATISTICS = {"column_mass": (True, True), "diagonal_mass": (False, True),
                    "estimated_columns": (True, False), "estimated_diagonals": (False, False)}


class _ProfileSums:
    """Running sums of one site's statistics at one ``(n_q, n_k)``."""

    def __init__(self, heads: int, n_q: int, n_k: int, block: int):
        self.n_q, self.n_k, self.block = n_q, n_k, block
        self.batches = 0
        self.buckets = offset_buckets(n_q, n_k)
        self.blocks = (math.ceil(n_q / block), math.ceil(n_k / block))
        self.heads = heads
        # Block mass and valid rows per input (sequence): a family estimated per input
        # (dynamic_blocks) is modelled on each input's own layout, not on their mean; and the
        # block mass of the rows its estimate reads, which choose that layout.
        self.input_block_mass: list[torch.Tensor] = []        # [H, blocks] each
        self.input_sampled_mass: list[torch.Tensor] = []      # [H, blocks] each
        self.input_rows: list[torch.Tensor] = []              # [H] each
        # Column and diagonal mass per input, and those of the queries vertical_slash's
        # estimate reads, which choose an input's lines.
        self.input_lines: dict[str, list[torch.Tensor]] = {name: [] for name in _LINE_STATISTICS}
        self.column_mass = torch.zeros(heads, n_k, dtype=torch.float64)
        self.diagonal_mass = torch.zeros(heads, n_q + n_k - 1, dtype=torch.float64)
        self.column_offset_mass = torch.zeros(heads, n_k * self.buckets, dtype=torch.float64)

    def indices(self, rows, cols, d) -> dict[str, torch.Tensor]:
        """Flat position of every (row, key) pair in each statistic; ``sampled_rows``: which
        of ``rows`` the sampled block mass reads, ``sampled_block_mass`` their pairs' positions."""
        block_mass = (rows // self.block)[:, None] * self.blocks[1] + (cols // self.block)[None, :]
        sampled = torch.isin(rows, spread_rows(self.block, SAMPLED_ROWS, self.n_q, rows.device)).nonzero().flatten()
        queries = get_pattern("vertical_slash").estimating_rows({"queries": ESTIMATING_QUERIES}, self.n_q, rows.device)
        estimating = torch.isin(rows, queries).nonzero().flatten()
        return {
            "block_mass": block_mass.flatten(),
            "sampled_rows": sampled,
            "sampled_block_mass": block_mass[sampled].flatten(),
            "estimating_rows": estimating,
            "estimated_diagonals": (d[estimating] + self.n_q - 1).flatten(),
            "diagonal_mass": (d + self.n_q - 1).flatten(),
            "column_offset_mass": (cols[None, :] * self.buckets + offset_bucket(d.abs())).flatten(),
        }

    def start_batch(self, size: int) -> None:
        """A calibration call of ``size`` inputs: the next :meth:`add` calls are theirs."""
        self.batches += 1
        for _ in range(size):
            self.input_block_mass.append(torch.zeros(self.heads, math.prod(self.blocks), dtype=torch.float64))
            self.input_sampled_mass.append(torch.zeros(self.heads, math.prod(self.blocks), dtype=torch.float64))
            self.input_rows.append(torch.zeros(self.heads, dtype=torch.float64))
            for name, sums in self.input_lines.items():
                per_column = _LINE_STATISTICS[name][0]
                sums.append(torch.zeros(self.heads, self.n_k if per_column else self.n_q + self.n_k - 1,
                                        dtype=torch.float64))

    def add(self, heads: slice, probs: torch.Tensor, valid: torch.Tensor, index: dict,
            columns: slice = slice(None)) -> None:
        """Add probabilities ``[B, h, rows, keys]`` of ``heads`` and query rows ``index`` is for
        (of the last :meth:`start_batch`'s ``B`` inputs), on the key ``columns`` alone (every
        other probability of these rows is 0); ``index`` covers those columns."""
        batch = probs.shape[0]
        for position, rows in enumerate(valid.sum(2).double().cpu()):
            self.input_rows[position - batch][heads] += rows
        blocks, diagonals = math.prod(self.blocks), self.diagonal_mass.shape[1]
        for position, input_probs in enumerate(probs):
            self.input_block_mass[position - batch][heads] += self._scatter(
                input_probs.flatten(1), index["block_mass"], blocks)
            self.input_sampled_mass[position - batch][heads] += self._scatter(
                input_probs[:, index["sampled_rows"]].flatten(1), index["sampled_block_mass"], blocks)
            estimating = input_probs[:, index["estimating_rows"]]
            lines = {"column_mass": input_probs.sum(1).double().cpu(),
                     "diagonal_mass": self._scatter(input_probs.flatten(1), index["diagonal_mass"], diagonals),
                     "estimated_columns": estimating.sum(1).double().cpu(),
                     "estimated_diagonals": self._scatter(estimating.flatten(1), index["estimated_diagonals"],
                                                          diagonals)}
            for name, sums in self.input_lines.items():
                sums[position - batch][heads, columns if _LINE_STATISTICS[name][0] else slice(None)] += lines[name]
        if batch == 1:               # the batch's sums are its one input's
            self.column_mass[heads, columns] += lines["column_mass"]
            self.diagonal_mass[heads] += lines["diagonal_mass"]
            flat = probs[0].flatten(1)
        else:
            probs = probs.sum(0)                              # over the batch: [h, rows, keys]
            self.column_mass[heads, columns] += probs.sum(1).double().cpu()
            flat = probs.flatten(1)
            self.diagonal_mass[heads] += self._scatter(flat, index["diagonal_mass"], diagonals)
        width = self.column_offset_mass.shape[1]
        self.column_offset_mass[heads] += self._scatter(flat, index["column_offset_mass"], width)

    @staticmethod
    def _scatter(flat: torch.Tensor, positions: torch.Tensor, width: int) -> torch.Tensor:
        """``flat`` ``[h, pairs]`` summed into ``width`` slots at ``positions``, float64 on the CPU."""
        part = torch.zeros(flat.shape[0], width, dtype=flat.dtype, device=flat.device)
        return part.index_add_(1, positions, flat).double().cpu()

    def profile(self, causal: bool) -> AttentionProfile:
        total_rows = torch.stack(self.input_rows).sum(0)
        rows = total_rows.clamp(min=1)[:, None]
        grid = (self.heads, len(self.input_rows), *self.blocks)
        return AttentionProfile(
            n_q=self.n_q, n_k=self.n_k, causal=causal, block=self.block, batches=self.batches,
            rows=total_rows,
            block_mass=(torch.stack(self.input_block_mass).sum(0) / rows).view(-1, *self.blocks),
            input_block_mass=self._per_input(self.input_block_mass, scaled=True).reshape(grid),
            input_sampled_mass=self._per_input(self.input_sampled_mass, scaled=False).reshape(grid),
            column_mass=self.column_mass / rows,
            diagonal_mass=self.diagonal_mass / rows,
            column_offset_mass=(self.column_offset_mass / rows).view(-1, self.n_k, self.buckets),
            **{f"input_{name}": self._per_input(sums, scaled=_LINE_STATISTICS[name][1])
               for name, sums in self.input_lines.items()})

    def _per_input(self, sums: list[torch.Tensor], scaled: bool) -> torch.Tensor:
        """``[H, inputs, ...]`` of per-input ``[H, ...]`` sums, divided by each input's rows
        where ``scaled``."""
        stacked = torch.stack(sums)
        if scaled:
            stacked = stacked / torch.stack(self.input_rows).clamp(min=1)[..., None]
        return stacked.transpose(0, 1)


def _select(mask: torch.Tensor | None, heads: slice, rows: slice) -> torch.Tensor | None:
    """The part of a 4-d broadcastable mask for these heads and query rows."""
    if mask is None:
        return None
    return mask[:, heads if mask.shape[1] > 1 else slice(None), rows if mask.shape[2] > 1 else slice(None)]


def _keys(mask: torch.Tensor | None, last_key: int) -> torch.Tensor | None:
    """A 4-d broadcastable mask's first ``last_key`` key columns."""
    return mask if mask is None or mask.shape[-1] == 1 else mask[..., :last_key]


def _is_causal_mask(mask: torch.Tensor, d: torch.Tensor) -> bool:
    """Whether ``mask`` (rows of ``d``) keeps exactly ``d >= 0``, with additive value 0 there."""
    causal = d >= 0
    if mask.dtype == torch.bool:
        return bool((mask == causal).all())
    return bool(((mask > MASKED_ADDITIVE) == causal).all() and (mask.masked_fill(~causal, 0) == 0).all())


class _Recorder:
    """Accumulates statistics for the sites the interpreter reaches."""

    def __init__(self, sites: dict, block: int, chunk_elements: int):
        self.sites = sites                   # fx node name -> AttentionSite
        self.block = block
        self.chunk_elements = chunk_elements
        self.sums: dict[str, dict[tuple[int, int], _ProfileSums]] = {name: {} for name in sites}
        self.mask_is_causal: dict[str, bool] = {}
        self.index_cache: dict[tuple, dict[str, torch.Tensor]] = {}
        self.index_cache_bytes, self.max_index_cache_bytes = 0, INDEX_CACHE_BYTES

    def record(self, node_name: str, q, k, mask, scale: float, causal: bool) -> None:
        batch, heads, n_q, _ = q.shape
        n_k = k.shape[-2]
        site_sums = self.sums[node_name]
        sums = site_sums.setdefault((n_q, n_k), _ProfileSums(heads, n_q, n_k, self.block))
        sums.start_batch(batch)
        mask = mask_4d(mask)
        k = k.repeat_interleave(heads // k.shape[1], dim=1)     # GQA: key head of each query head
        # As many heads as fit with at least 64 query rows, then as many rows as fit.
        head_chunk = max(1, min(heads, self.chunk_elements // (batch * n_k * min(n_q, 64))))
        row_chunk = max(1, self.chunk_elements // (batch * head_chunk * n_k))
        cols = torch.arange(n_k, device=q.device)
        pure_causal = mask is not None
        for start in range(0, n_q, row_chunk):
            rows = torch.arange(start, min(start + row_chunk, n_q), device=q.device)
            d = offsets(rows, cols, n_q, n_k)
            if pure_causal:
                pure_causal = _is_causal_mask(_select(mask, slice(None), slice(start, start + len(rows))), d)
            # Only the key columns holding any mass are computed and scattered (about half of
            # them under a causal mask): the probabilities are the same, as are the sums. Causal
            # rows (by flag, or a mask found causal so far) end at the last row's diagonal.
            last_key = max(0, min(n_k, start + len(rows) + n_k - n_q)) if causal or pure_causal else n_k
            for h0 in range(0, heads, head_chunk):
                h = slice(h0, min(h0 + head_chunk, heads))
                probs, valid = _probabilities(q[:, h, start:start + len(rows)], k[:, h, :last_key],
                                              _keys(_select(mask, h, slice(start, start + len(rows))), last_key),
                                              d[:, :last_key], scale, causal)
                span = (0, last_key) if causal or pure_causal else _nonzero_columns(probs)
                if span[1] - span[0] < probs.shape[-1]:
                    probs = probs[..., span[0]:span[1]]
                index = self._indices(sums, rows, cols[span[0]:span[1]], d[:, span[0]:span[1]])
                sums.add(h, probs, valid, index, slice(*span))
        if mask is not None:
            self.mask_is_causal[node_name] = self.mask_is_causal.get(node_name, True) and pure_causal

    def _indices(self, sums: _ProfileSums, rows, cols, d) -> dict[str, torch.Tensor]:
        """``sums.indices``, kept for the next site and batch of the same shape (they are the
        same for every site) while the kept ones stay under ``index_cache_bytes``."""
        key = (sums.n_q, sums.n_k, int(rows[0]), len(rows), int(cols[0]) if len(cols) else 0, len(cols))
        index = self.index_cache.get(key)
        if index is None:
            index = sums.indices(rows, cols, d)
            size = sum(positions.numel() * positions.element_size() for positions in index.values())
            if self.index_cache_bytes + size <= self.max_index_cache_bytes:
                self.index_cache[key] = index
                self.index_cache_bytes += size
        return index

    def finish(self, causal_flags: dict[str, bool]) -> dict[str, AttentionStats]:
        stats = {}
        for node_name, site in self.sites.items():
            mask_is_causal = self.mask_is_causal.get(node_name)
            causal = causal_flags[node_name] or bool(mask_is_causal)
            stats[site.name] = AttentionStats(
                num_heads=site.num_heads, causal=causal, mask_is_causal=mask_is_causal,
                profiles={key: sums.profile(causal) for key, sums in self.sums[node_name].items()})
        return stats


def _nonzero_columns(probs: torch.Tensor) -> tuple[int, int]:
    """``(first, end)``: the key columns of ``probs [..., n_k]`` outside which every value is 0."""
    nonzero = torch.nonzero((probs != 0).flatten(0, -2).any(0)).flatten()
    if nonzero.numel() == 0:
        return 0, 0
    return int(nonzero[0]), int(nonzero[-1]) + 1


def _probabilities(q, k, mask, d, scale: float, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities ``[B, h, rows, n_k]`` in fp32 (padding rows zeroed) and the
    valid-row flags ``[B, h, rows]``."""
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    allowed = torch.ones_like(d, dtype=torch.bool)
    if causal:
        allowed = d >= 0
        scores.masked_fill_(~allowed, float("-inf"))
    if mask is not None:
        if mask.dtype == torch.bool:
            scores.masked_fill_(~mask, float("-inf"))
            allowed = allowed & mask
        else:
            scores += mask.float()
            allowed = allowed & (mask > MASKED_ADDITIVE)
    valid = allowed.any(-1).expand(scores.shape[:-1])
    probs = torch.softmax(scores, dim=-1)
    if not bool(valid.all()):       # padding rows: NaN (all -inf) or uniform (finfo.min) -> 0
        probs = probs.nan_to_num(0.0) * valid[..., None]
    return probs, valid


def profile_from_probabilities(probs: torch.Tensor, causal: bool, block: int) -> AttentionProfile:
    """The profile of given attention probabilities ``[H, n_q, n_k]`` (rows summing to 1, or
    0 for padding): for tests and for checking planted models."""
    heads, n_q, n_k = probs.shape
    sums = _ProfileSums(heads, n_q, n_k, block)
    rows, cols = torch.arange(n_q), torch.arange(n_k)
    valid = probs.sum(-1) > 0.5
    sums.start_batch(1)
    sums.add(slice(None), probs[None].float(), valid[None], sums.indices(rows, cols, offsets(rows, cols, n_q, n_k)))
    return sums.profile(causal)


class Calibrate:
    """Measure per-head attention statistics into ``ctx.attention_stats[site.name]``.

    ``chunk_elements`` bounds the scores held at once (see the module docstring). Runs on
    ``ctx.calibration`` (the example inputs when empty), with the manager's progress bar
    over (batch, site) steps (:meth:`CompileContext.progress`).
    """

    name = "calibrate"

    def __init__(self, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS):
        self.chunk_elements = chunk_elements

    def run(self, gm: torch.fx.GraphModule, ctx: CompileContext) -> PassResult:
        sites = {site.node: site for site in ctx.plan.attention}
        batches = ctx.calibration or [(ctx.example_args, ctx.example_kwargs)]
        # Square tiles that divide both block sizes of the target, so they pool to either.
        block = math.gcd(ctx.target.block_m, ctx.target.block_n)
        recorder = _Recorder(sites, block, self.chunk_elements)
        steps = len(batches) * len(sites)
        with ctx.progress(steps, "calibrate", unit="site") as progress:

            def record(node, args, kwargs, output):
                recorder.record(node.name, *args[:2], *args[3:6])
                progress.update(1)

            nodes = [node for node in gm.graph.nodes
                     if node.op == "call_function" and node.target == ATTENTION and node.name in sites]
            observe = dict.fromkeys(nodes, record)
            if ctx.verification or not ctx.calibration or ctx.budget is not None:   # (the search runs its own)
                runner = GraphRunner(gm)
                for args, kwargs in batches:
                    runner.run(args, kwargs, observe=observe)
            else:                # verify measures these batches: their dense runs serve it too
                runner = GraphRunner(gm, nodes)
                ctx.dense_runs = [runner.run_and_cache(args, kwargs, observe=observe) for args, kwargs in batches]
        ctx.attention_stats = recorder.finish({node: site.causal for node, site in sites.items()})
        for site in ctx.plan.attention:
            mask_is_causal = ctx.attention_stats[site.name].mask_is_causal
            if mask_is_causal is not None:
                site.extra["mask_is_causal"] = mask_is_causal
        lengths = sorted({key for stats in ctx.attention_stats.values() for key in stats.profiles})
        return PassResult(gm, False, {"batches": len(batches), "sites": len(sites),
                                      "lengths": [list(key) for key in lengths],
                                      "masks_causal": sum(bool(s.extra.get("mask_is_causal"))
                                                          for s in ctx.plan.attention)})
