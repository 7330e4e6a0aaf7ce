"""Dynamic block layout: per input, each query block keeps the key blocks that hold a share of
its estimated attention mass (FlexPrefill's query-aware heads, XAttention; MInference's
block-sparse head with a mass threshold in place of a fixed count).

params: ``block`` (token side of the square blocks), ``share`` (the share of each query
block's estimated mass its kept key blocks must hold), ``samples`` (estimating query rows per
query block) and ``density`` (``[d, length, decay]``: the fraction of the causal score matrix
the calibration inputs' own layouts keep, ``d`` at ``length`` and ``d * (N / length) **
-decay`` at ``N``: the cost model's figure, as the layout is chosen per input).

Per input, batch and head, ``samples`` rows of every query block, spread over the block,
attend to all keys; their probabilities summed per key block and averaged over the rows are
the block's estimated mass. Each query block keeps its heaviest key blocks until they hold
``share`` of its mass, plus the key blocks its own rows' diagonal crosses and key block 0
(the sink), always. For heads whose mass is spread (SmolLM2's early layers at 8k, where no
column + diagonal budget holds it) rows sampled per block find the layout: recall 0.97-0.98
at a third of the causal pairs (docs/benchmarks.md, "What a 50 % cut at 8k would take").
Sampled rows estimate about as well as XAttention's antidiagonal sums at the same cost
(stride 8 against 8 rows a block: top-1 0.957 against 0.956 on SmolLM2 at 8k, every head at
share 0.98) and need no reshaped copy of q and k.

Costs and recalls are estimates: the pair count is ``density`` of the score matrix (its
decay measured between the calibration length and its first half: for a causal head the
first half of the rows attend the first half of the keys alone, so that part of the profile
is the head at half the length; SmolLM2's spread layers keep 0.5-0.6 of the pairs at 2k
and 0.3-0.4 at 8k), the cost adds the estimate's ``samples x N / block`` rows of scores
(its kernel's one pass over the keys), and the fit's recall is the mean share of each calibration
input's mass kept by the layout its estimate chooses at ``share``: from the mass of the rows
calibration samples as the estimate does (``fitting.SAMPLED_ROWS``), so the recall counts
what the estimate misses; per input, as the family chooses a layout per input (the layout of
their mean keeps more blocks: SmolLM2 at 2k, two inputs, layer 3: 0.57 of the pairs where
each input's keeps 0.40, 0.26 at 8k).
"""
from __future__ import annotations

import math

import sympy
import torch

from sparsec.ir.shape_cache import shape_cache
from sparsec.patterns import fitting
from sparsec.patterns.base import N, Pattern, full_pairs, log_kept_pairs, logging_kept_pairs, register
from sparsec.patterns.shared import diagonal_blocks, estimating_probs, tile_pairs

# Shares a fit tries, least first; the first whose recall reaches the target is taken.
SHARES = (0.8, 0.85, 0.9, 0.93, 0.95, 0.96, 0.97, 0.98, 0.99)
# Estimating rows per query block: those whose mass calibration keeps (fitting.SAMPLED_ROWS
# says why 16); the estimate costs samples / block of a head's q.k scores.
SAMPLES = fitting.SAMPLED_ROWS
# A grid of fewer blocks a side is not fitted (recall 0): the forced blocks cover nearly
# everything there, so the fit would say nothing about longer inputs (as block_topk).
MIN_GRID = 4


@register
class DynamicBlocks(Pattern):
    kind = "dynamic_blocks"
    dynamic = True
    # Lookup-table template, KEEP_KIND 1 with the estimated layout as a per-head grid.
    triton_template = "lut"
    triton_flags = {"KEEP_KIND": 1, "HAS_COLUMNS": False}

    def merge(self, first, second):
        """The larger share holds the smaller one's blocks (same estimate: block and samples)."""
        if (first["block"], first["samples"]) != (second["block"], second["samples"]):
            return None
        length = max(first["density"][1], second["density"][1])
        return {**first, "share": max(first["share"], second["share"]),
                "density": [max(_density_at(first, length), _density_at(second, length)), length,
                            min(first["density"][2], second["density"][2])]}

    def index_keep(self, params, i, j, d, ops):
        raise TypeError("dynamic_blocks is dynamic: use estimate_indices() and dynamic_mask()")

    def block_classes(self, params, n_q, n_k, causal, block_m, block_n, device="cpu", keys_in_range_only=False):
        raise TypeError("dynamic_blocks has no static block layout; it is estimated per input")

    def estimating_queries(self, params: dict, n_q: int) -> int:
        """How many queries the estimate reads: ``samples`` per query block."""
        return int(params["samples"]) * math.ceil(n_q / int(params["block"]))

    def estimating_rows(self, params: dict, n_q: int, device=None) -> torch.Tensor:
        """``samples`` rows of each query block, spread over it (its first and last row
        included; the last block's clamped to ``n_q - 1``), block by block."""
        return fitting.spread_rows(int(params["block"]), int(params["samples"]), n_q,
                                   None if device is None else torch.device(device))

    def estimate_from_rows(self, params: dict, q_rows: torch.Tensor, rows: torch.Tensor, n_q: int,
                           k: torch.Tensor, scale: float, causal: bool, mask: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, int]:
        """``(layout, block)``: the kept blocks, boolean ``[B, H, ceil(n_q/block),
        ceil(n_k/block)]``, from the estimating rows (keys the user mask removes get no mass)."""
        probs = estimating_probs(q_rows, rows, n_q, k, scale, causal, mask)[0]   # [B, H, L, n_k]
        block = int(params["block"])
        blocks_k = math.ceil(k.shape[-2] / block)
        probs = torch.nn.functional.pad(probs, (0, blocks_k * block - k.shape[-2]))
        row_mass = probs.view(*probs.shape[:-1], blocks_k, block).sum(-1)
        return self.layout_from_row_mass(params, row_mass, n_q, k.shape[-2], causal)

    def layout_from_row_mass(self, params: dict, row_mass: torch.Tensor, n_q: int, n_k: int,
                             causal: bool) -> tuple[torch.Tensor, int]:
        """``(layout, block)`` from the mass each estimating row gives each key block
        (``[B, H, samples x ceil(n_q/block), ceil(n_k/block)]``, rows block by block): a query
        block's estimated mass is its rows' mean."""
        block, samples = int(params["block"]), int(params["samples"])
        mass = row_mass.view(*row_mass.shape[:-2], -1, samples, row_mass.shape[-1]).mean(-2)
        layout = keep_by_share(mass, forced_blocks(n_q, n_k, block, mass.device), float(params["share"]))
        if logging_kept_pairs() and n_q == n_k:
            kept = int((tile_pairs(n_k, block, causal).to(layout.device) * layout).sum())
            log_kept_pairs(self.kind, kept, layout.shape[0] * layout.shape[1] * int(full_pairs(n_k, causal)))
        return layout, block

    def dynamic_mask(self, layout: torch.Tensor, block: int, n_q: int, n_k: int, causal: bool,
                     rows: torch.Tensor | None = None) -> torch.Tensor:
        """Boolean ``[B, H, n_q, n_k]`` mask of an estimated layout (``[B, H, len(rows),
        n_k]``: the query rows ``rows`` alone)."""
        device = layout.device
        rows = torch.arange(n_q, device=device) if rows is None else rows.to(device)
        cols = torch.arange(n_k, device=device)
        mask = layout.index_select(-2, rows // block).index_select(-1, cols // block)
        if causal:
            mask = mask & (rows[:, None] + (n_k - n_q) >= cols[None, :])
        return mask

    def dynamic_mask_mod(self, layout: torch.Tensor, block: int, n_q: int, n_k: int, causal: bool):
        """FlexAttention's ``mask_mod(b, h, q_idx, kv_idx)`` of an estimated layout."""
        def mask_mod(b, h, q_idx, kv_idx):
            kept = layout[b, h, q_idx // block, kv_idx // block]
            return kept & (q_idx + (n_k - n_q) >= kv_idx) if causal else kept
        return mask_mod

    def pairs(self, params, n, causal):
        return _density_at(params, n) * full_pairs(n, causal)

    def pairs_expr(self, params, causal):
        density, length, decay = (sympy.Rational(repr(float(x))) for x in params["density"])
        return sympy.Min(1, density * (N / length) ** -decay) * full_pairs(N, causal)

    def overhead_expr(self, params, head_dim, causal):
        """The estimate's scores: ``samples`` queries a block against the keys, once (its
        kernel's one pass: each key block's log-sum-exp, the rows' from those); under the
        causal cut half the keys on average."""
        keys = N / 2 if causal else N
        return 2 * head_dim * int(params["samples"]) * N / int(params["block"]) * keys

    def describe(self, params):
        return (f"share={params['share']}, block={params['block']}, {params['samples']} rows a block, "
                f"density {params['density'][0]} at {params['density'][1]}, decay {params['density'][2]}")

    def _input_layouts(self, profile, params, blocks: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mass, kept)``, ``[inputs, blocks_q, blocks_k]``: each calibration input's block
        mass, and the layout its estimate chooses at ``share`` from the block mass of the
        rows calibration sampled as the estimate does (``samples`` other than those are
        modelled as if they read them), on the first ``blocks`` query and key blocks (a causal
        head at that length). Per input, as the family chooses it: the layout of two inputs'
        mean mass keeps the blocks either needs (SmolLM2 at 2k: a density of 0.57 where each
        input's own keeps 0.40)."""
        block = int(params["block"])
        if block != profile.block:
            raise ValueError(f"dynamic_blocks is fitted on the profile's own block ({profile.block}), not {block}")
        mass, estimated = profile.input_block_mass, profile.input_sampled_mass
        n_q, n_k = profile.n_q, profile.n_k
        if blocks is not None:
            mass, estimated = mass[:, :blocks, :blocks], estimated[:, :blocks, :blocks]
            n_q = n_k = blocks * block
        return mass, keep_by_share(estimated, forced_blocks(n_q, n_k, block, mass.device), float(params["share"]))

    def _profile_density(self, profile, params, blocks: int) -> float:
        """Mean fraction of the causal pairs of the first ``blocks`` blocks the inputs'
        layouts keep."""
        block = int(params["block"])
        _, kept = self._input_layouts(profile, params, blocks)
        n = min(blocks * block, profile.n_k)
        kept_pairs = (tile_pairs(n, block, profile.causal) * kept).sum((-2, -1))
        return float(kept_pairs.double().mean()) / full_pairs(n, profile.causal)

    def recall(self, profile, params):
        """The mean share of an input's mass its own layout keeps."""
        mass, kept = self._input_layouts(profile, params)
        return float((mass * kept).sum((-2, -1)).mean())

    def fit(self, profiles, recall):
        """The least share in :data:`SHARES` whose profile layouts reach ``recall`` at every
        calibration length (or the greatest); ``density`` from the longest one."""
        longest = profiles[-1]
        params = {"block": longest.block, "samples": SAMPLES, "share": SHARES[-1], "density": [1.0, longest.n_k, 0.0]}
        if min(math.ceil(longest.n_q / longest.block), math.ceil(longest.n_k / longest.block)) < MIN_GRID:
            return params, 0.0
        for share in SHARES:
            params["share"] = share
            if fitting.worst_recall(self, profiles, params) >= recall - 1e-12:
                break
        blocks = math.ceil(longest.n_k / longest.block)
        density = self._profile_density(longest, params, blocks)
        decay = 0.0
        if longest.causal and longest.n_q == longest.n_k:
            half = self._profile_density(longest, params, blocks // 2)
            decay = min(max(math.log2(half / density), 0.0), 1.0) if density > 0 else 0.0
        params["density"] = [round(density, 4), longest.n_k, round(decay, 4)]
        return params, fitting.worst_recall(self, profiles, params)


@shape_cache(maxsize=64)
def forced_blocks(n_q: int, n_k: int, block: int, device: torch.device) -> torch.Tensor:
    """The blocks every query block keeps: those its rows' diagonal crosses, and key block 0
    (made once per shape, read-only)."""
    forced = diagonal_blocks(n_q, n_k, block, device)
    forced[:, 0] = True
    return forced


def keep_by_share(mass: torch.Tensor, forced: torch.Tensor, share: float) -> torch.Tensor:
    """Boolean like ``mass`` (``[..., rows, blocks]``): per row the ``forced`` blocks, then the
    heaviest others until the kept ones hold ``share`` of the row's mass. A block without mass
    is never added."""
    rest = mass.masked_fill(forced, 0.0)
    ordered, order = rest.sort(dim=-1, descending=True)
    needed = share * mass.sum(-1, keepdim=True) - (mass - rest).sum(-1, keepdim=True)
    before = ordered.cumsum(-1) - ordered                 # mass of the heavier blocks
    taken = (before < needed) & (ordered > 0)
    return forced.expand_as(mass) | torch.zeros_like(taken).scatter(-1, order, taken)


def _density_at(params: dict, n: int) -> float:
    """``params["density"]`` at length ``n``."""
    density, length, decay = params["density"]
    return min(1.0, float(density) * (n / float(length)) ** -float(decay))
