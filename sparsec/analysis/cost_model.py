"""Per-target cost model: predicted attention time of a head's pattern at length N.

A pattern's work is its FLOP count (``Pattern.cost``: ``4 * head_dim`` per computed
(query, key) pair, counted exactly at ``N``, plus the pattern's overhead). A kernel
launch over ``heads`` heads of ``batch`` sequences is predicted as::

    t = launch + batch * heads * (flops(N) / rate + ceil(N / 128) * row_cost * head_dim / 128)

with ``rate`` the kernel's effective TFLOP/s over computed pairs and ``row_cost`` what each
128-row query block costs besides its pairs (loading Q, the softmax epilogue, storing O).
Dense heads use the dense kernel's constants, every other pattern the block-sparse
kernel's. A site whose heads are all dense is one dense launch; any other site is one launch
per head group (``sparse_attention``). A pattern slower than dense at ``N`` (below its
*crossover length*) is never chosen: the plan keeps such heads dense.

The constants are fitted to measurements: on an H100 by ``sparsec bench cost-model``
(dense SDPA and block-sparse FlexAttention, the raw numbers in
``sparsec/data/attention_calibration_h100.json``), on the CPU by ``sparsec bench cost-model
--cpu`` against sparsec's CPU path (:mod:`sparsec.runtime.cpu_attention`), whose sparse groups
also pay ``chunk_us`` per 128-row chunk (one SDPA call serves a group's heads), whose split
sites pay ``split_row_block_us`` per dense head and row block, whose dynamic patterns pay
``dynamic_layout_ns`` per score element, and whose sites must be predicted to save
``min_site_saving`` of their dense time (the fit's spread). ``docs/benchmarks.md`` records
the calibrations and how well the fits hold.

Groups that FlashAttention-4 serves (:func:`attention_backend`) take the ``fa4`` rates where
the target's calibration has them, and all of a site's FA4 groups share one launch.

A site also costs host time: an eager model issues its kernels from Python, and where that
outpaces the GPU (a small model, short inputs) the host sets the pace. Where the calibration
measured it (:class:`HostCosts`), a site is priced ``max(GPU time, host time)``: a sparse site
issues more than a dense one (its group table, one launch per group, a dynamic group's
estimate of some 60 small kernels), so on short inputs it loses to dense even where its GPU
time is lower. A dynamic group's estimate also costs GPU time per (head, estimating query,
key) element beyond its FLOPs (``dynamic_estimate_ps``: its kernel's block reductions and
the layout choice, measured).

Other GPU targets are scaled from the h100 calibration until measured: rates by the datasheet
peak TFLOP/s, row costs by memory bandwidth, launch constants by the profile's launch
overhead.

Linears (weight sparsity): ``2 * tokens * in * out`` FLOPs at the dense kernel's
rate, divided by the speedup of the ``sparse_linear`` kernel the runtime would pick
(:mod:`sparsec.analysis.linear_costs`: its H100-measured table, nearest shape). A sparse
weight gets no speed benefit where the runtime runs it dense: on CPU targets, for
structures without a GPU kernel (``4:8``, unstructured), for fp32 weights (the kernels run
fp16 / bf16), and where the table says the sparse kernel is not ``MIN_SPEEDUP`` faster
(2:4 below ~8k tokens, for one).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from functools import lru_cache

import torch

from sparsec.analysis.measurements import packaged, packaged_targets
from sparsec.ir import config

from sparsec.patterns import get_pattern
from sparsec.ir.targets import Target, get_target

ROW_BLOCK = 128          # query rows per block in the calibrated row cost
REFERENCE_HEAD_DIM = 128


@dataclass(frozen=True)
class KernelRates:
    tflops: float            # effective rate over computed pairs
    row_block_us: float      # per (sequence, head, 128-row query block), at head_dim 128
    launch_us: float         # fixed cost of one launch
    chunk_us: float = 0.0    # per group and 128-row query chunk (the CPU path: one SDPA call a chunk)
    # Whether row_block_us grows with the head dim (loading Q, storing O). FA4's does not: it is
    # its mask_mod's per-score calls on a row's partial blocks (sink_window at 16k on the H200:
    # 0.348 / 0.438 / 0.772 ms at head dims 64 / 128 / 256, predicted 0.32 / 0.45 / 0.71 so,
    # 0.23 / 0.45 / 0.89 scaled with the head dim).
    row_scales_with_head_dim: bool = True


@dataclass(frozen=True)
class HostCosts:
    """Host time (us) of one call of sparsec's attention ops on a GPU, as a compiled model
    calls them (``sparsec bench cost-model``, series 5)."""
    dense_site_us: float       # sparsec.attention (SDPA)
    sparse_site_us: float      # sparsec.sparse_attention with one Triton group
    group_us: float            # each further launch
    dynamic_group_us: float    # a dynamic group's per-call estimate and tables
    fa4_us: float              # a site's FA4 launch, beyond a Triton launch's

    def sparse_seconds(self, launches: int, dynamic_groups: int, on_fa4: bool) -> float:
        return 1e-6 * (self.sparse_site_us + self.group_us * max(launches - 1, 0)
                       + self.dynamic_group_us * dynamic_groups + (self.fa4_us if on_fa4 else 0.0))


@dataclass(frozen=True)
class CostProfile:
    target: str
    dense: KernelRates
    sparse: KernelRates
    calibrated: bool         # measured on the target, or scaled from the h100 calibration
    # Per head and (query, key) element: building a dynamic pattern's layout per input where
    # the runtime does it densely (the CPU path).
    dynamic_layout_ns: float = 0.0
    fa4: KernelRates | None = None     # block-sparse FlashAttention-4, where measured (sm90+)
    host: HostCosts | None = None      # where measured (GPUs)
    # Per head and (estimating query, key) element: a dynamic group's estimate on a GPU, beyond
    # its FLOPs (which are priced at the sparse rate).
    dynamic_estimate_ps: float = 0.0
    # Per (sequence, dense head, 128-row block) of a site that also runs sparse groups: the CPU
    # path gathers those heads apart from their key/value group and scatters them back.
    split_row_block_us: float = 0.0
    # The share of its dense time a sparse site must be predicted to save: the spread of the
    # fit and of run-to-run timings where they are wide (a shared CPU), 0 where the profile
    # predicts a site's side of dense reliably.
    min_site_saving: float = 0.0

    def to_dict(self) -> dict:
        return {"target": self.target, "calibrated": self.calibrated,
                "dense": vars(self.dense), "sparse": vars(self.sparse),
                "fa4": None if self.fa4 is None else vars(self.fa4),
                "dynamic_layout_ns": self.dynamic_layout_ns,
                "host": None if self.host is None else vars(self.host),
                "dynamic_estimate_ps": self.dynamic_estimate_ps, "split_row_block_us": self.split_row_block_us,
                "min_site_saving": self.min_site_saving}


def _calibrated(target: str) -> CostProfile:
    """The profile fitted to ``sparsec/data/attention_calibration_<target>.json``."""
    run = packaged("attention_calibration", target)
    fit = run["fit"]
    return CostProfile(target, dense=KernelRates(**fit["dense"]), sparse=KernelRates(**fit["sparse"]),
                       calibrated=True, dynamic_layout_ns=fit.get("dynamic_layout_ns", 0.0),
                       fa4=KernelRates(**fit["fa4"], row_scales_with_head_dim=False) if "fa4" in fit else None,
                       host=HostCosts(**fit["host"]) if "host" in fit else None,
                       dynamic_estimate_ps=fit.get("dynamic_estimate_ps", 0.0),
                       split_row_block_us=fit.get("split_row_block_us", 0.0),
                       min_site_saving=fit.get("min_site_saving", 0.0))


# Every target with a shipped calibration: GPUs by `sparsec bench cost-model`, the CPU by its `--cpu`
# (docs/benchmarks.md says how each was measured).
CALIBRATED = {target: _calibrated(target) for target in packaged_targets("attention_calibration")}
_REFERENCE = get_target("h100")


def cost_profile(target: "str | Target") -> CostProfile:
    """The calibrated profile of ``target``, or one scaled from h100's by its datasheet."""
    target = get_target(target)
    if target.name in CALIBRATED:
        return CALIBRATED[target.name]
    base = CALIBRATED["h100"]

    def scaled(rates: KernelRates) -> KernelRates:
        return replace(rates, tflops=rates.tflops * target.peak_tflops / _REFERENCE.peak_tflops,
                       row_block_us=rates.row_block_us * _REFERENCE.bandwidth_gbs / target.bandwidth_gbs,
                       launch_us=rates.launch_us * target.launch_overhead_us / _REFERENCE.launch_overhead_us)

    return CostProfile(target.name, scaled(base.dense), scaled(base.sparse), calibrated=False,
                       fa4=None if base.fa4 is None else scaled(base.fa4))


def head_flops(kind: str, params: dict, n: int, causal: bool, head_dim: int) -> float:
    return _head_flops(kind, json.dumps(params, sort_keys=True), n, causal, head_dim)


@lru_cache(maxsize=1 << 16)
def _head_flops(kind: str, params_json: str, n: int, causal: bool, head_dim: int) -> float:
    """FLOPs of one head of ``kind`` at ``n_q = n_k = n`` (``Pattern.cost``: the pattern's
    exact pair count and its overhead), kept per parameters: classification, merging and the
    search price the same heads many times."""
    return get_pattern(kind).cost(json.loads(params_json), n, causal, head_dim)


@lru_cache(maxsize=1 << 14)
def _chunk_padding(kind: str, params_json: str, n: int, causal: bool) -> float:
    return get_pattern(kind).chunk_padding(json.loads(params_json), n, causal, ROW_BLOCK)


class CostModel:
    """Predicted attention times on one target (seconds)."""

    def __init__(self, target: "str | Target"):
        self.target = get_target(target)
        self.profile = cost_profile(self.target)

    def backend(self, kind: str, params: dict, n: int, causal: bool, head_dim: int,
                whole_site: bool = False) -> str:
        """The kernel a sparse site's group of ``kind`` runs on this target at length ``n``:
        on GPUs ``"fa4"`` where :func:`attention_backend` allows it and the target's measured
        FA4 rates predict it faster than Triton's (per computed block and per query row; on the
        H200 FA4 now wins both, 662 against 435 TFLOP/s, 0.045 against 0.043 us a row, where
        before its mask_mod was trimmed it paid 0.26 us a row and lost on short rows; a plain
        window that is its site's only group (``whole_site``) runs FA4's native window, which
        pays no more per row than dense), else ``"triton"`` (also for ``SPARSEC_FA4=0`` and
        targets without FA4 measurements, and for groups whose mask costs more than index
        compares per pair: :meth:`~sparsec.patterns.Pattern.costly_pair_mask`); ``"cpu"`` (the
        CPU path) elsewhere.
        Whether a site uses FA4 at all is decided for the site as a whole, host time included
        (:meth:`fa4_pays`)."""
        if self.target.device_type != "cuda":
            return "cpu"
        if (not config.fa4_backend() or self.profile.fa4 is None
                or attention_backend(self.target.arch, kind, head_dim) != "fa4"
                or get_pattern(kind).costly_pair_mask(params, FA4_BLOCK_M,
                                                      fa4_key_block(self.target.arch, head_dim))):
            # FA4's rates are measured on index-compare masks, and its mask_mod runs per score:
            # a table read per score (a mixed 16k site of stripes and layouts ran 1.07 ms on FA4
            # against 0.62 on Triton) or divisions (multi_diagonal, 5.36 against 1.26).
            return "triton"
        fa4 = self._fa4_rates(kind, params, n, whole_site)
        return "fa4" if self._head_seconds(fa4, kind, params, n, causal, head_dim) < \
            self._head_seconds(self.profile.sparse, kind, params, n, causal, head_dim) else "triton"

    def _fa4_rates(self, kind: str, params: dict, n: int, whole_site: bool) -> KernelRates:
        """FA4's rates for a group: its block-sparse path's (a mask_mod and block tables), or,
        for a plain window over the whole site, its native window's: the same rate over
        computed pairs with the dense kernel's per-query-block cost (FA4 walks the band
        itself; on the H200, window 512 at 16k over 32 heads ran 0.341 ms against 0.33
        predicted so, and GQA 32:8 at 4k 0.091 against 0.078: docs/benchmarks.md)."""
        fa4 = self.profile.fa4
        if whole_site and get_pattern(kind).native_window(params, n) is not None:
            return KernelRates(fa4.tflops, self.profile.dense.row_block_us, fa4.launch_us)
        return fa4

    def _rates(self, kind: str, backend: str, params: dict | None = None, n: int = 0,
               whole_site: bool = False) -> KernelRates:
        if get_pattern(kind).computes_all:
            return self.profile.dense
        return self._fa4_rates(kind, params, n, whole_site) if backend == "fa4" else self.profile.sparse

    def head_seconds(self, kind: str, params: dict, n: int, causal: bool, head_dim: int) -> float:
        """One head of one sequence, without the launch (a group sharing its site)."""
        if get_pattern(kind).computes_none:
            return 0.0
        backend = self.backend(kind, params, n, causal, head_dim)
        return self._head_seconds(self._rates(kind, backend, params, n), kind, params, n, causal, head_dim)

    def _head_seconds(self, rates: KernelRates, kind: str, params: dict, n: int, causal: bool,
                      head_dim: int) -> float:
        rows = math.ceil(n / ROW_BLOCK) * rates.row_block_us * 1e-6 * (
            head_dim / REFERENCE_HEAD_DIM if rates.row_scales_with_head_dim else 1.0)
        family = get_pattern(kind)
        layout = (n * n * self.profile.dynamic_layout_ns * 1e-9
                  + family.estimating_queries(params, n) * n * self.profile.dynamic_estimate_ps * 1e-12
                  if family.dynamic else 0.0)
        params_json = json.dumps(params, sort_keys=True)
        flops = _head_flops(kind, params_json, n, causal, head_dim)
        if self.target.device_type == "cpu" and not (family.computes_all or family.dynamic):
            # The CPU path runs each chunk of ROW_BLOCK rows over the union of their kept keys.
            flops *= _chunk_padding(kind, params_json, n, causal)
        return flops / (rates.tflops * 1e12) + rows + layout

    def launch_seconds(self, kind: str) -> float:
        """One launch of ``kind``'s kernel (dense, or Triton block-sparse)."""
        return 0.0 if get_pattern(kind).computes_none else self._rates(kind, "triton").launch_us * 1e-6

    def site_seconds(self, groups: list[tuple[str, dict, int]], n: int, causal: bool, head_dim: int,
                     batch: int = 1) -> float:
        """A site whose head groups are ``(kind, params, number of heads)``: one dense launch
        when every head is dense, else one launch for all the groups FA4 serves (one call with
        per-head tables) and one per other group, or Triton for every group where that is
        cheaper (:meth:`fa4_pays`); the larger of its GPU and host times where the host's are
        measured."""
        host = self.profile.host
        if all(get_pattern(kind).computes_all for kind, _, _ in groups):
            heads = sum(count for _, _, count in groups)
            gpu = self.launch_seconds("dense") + batch * heads * self.head_seconds("dense", {}, n, causal, head_dim)
            return max(gpu, host.dense_site_us * 1e-6 if host else 0.0)
        chosen, triton = self._site_options(groups, n, causal, head_dim, batch)
        return chosen if triton is None else min(chosen, triton)

    def site_pays(self, seconds: float, dense_seconds: float) -> bool:
        """Whether a sparse site predicted at ``seconds`` runs faster than the same site dense,
        by the profile's margin (:attr:`CostProfile.min_site_saving`)."""
        return seconds < (1 - self.profile.min_site_saving) * dense_seconds

    def fa4_pays(self, groups: list[tuple[str, dict, int]], n: int, causal: bool, head_dim: int,
                 batch: int = 1) -> bool:
        """Whether the site runs the groups FA4 serves on FA4: cheaper as a whole, GPU and host
        time, than Triton for every group. FA4's call costs the H200's host 82 us more than a
        Triton site: SmolLM2's sites at 1k are host-bound and stay on Triton."""
        chosen, triton = self._site_options(groups, n, causal, head_dim, batch)
        return triton is not None and chosen < triton

    def _site_options(self, groups, n: int, causal: bool, head_dim: int, batch: int) -> tuple[float, float | None]:
        """A sparse site's seconds with each group on the backend :meth:`backend` picks, and
        with Triton for every group (None where no group picked FA4: the same site)."""
        chosen, on_fa4 = self._sparse_site_seconds(groups, n, causal, head_dim, batch, True)
        return chosen, (self._sparse_site_seconds(groups, n, causal, head_dim, batch, False)[0] if on_fa4 else None)

    def _sparse_site_seconds(self, groups, n: int, causal: bool, head_dim: int, batch: int,
                             fa4: bool) -> tuple[float, bool]:
        """``(seconds, whether FA4 runs any group)`` of a sparse site, FA4 allowed or not."""
        host = self.profile.host
        work = launches = 0.0
        on_fa4, triton_launches, whole_site = False, 0, len(groups) == 1
        row_blocks = math.ceil(n / ROW_BLOCK)
        for kind, params, count in groups:
            backend = self.backend(kind, params, n, causal, head_dim, whole_site)
            backend = "triton" if backend == "fa4" and not fa4 else backend
            on_fa4 |= backend == "fa4"
            family = get_pattern(kind)
            if backend != "fa4":
                launches += self.launch_seconds(kind)
                triton_launches += 1
            if family.computes_all:
                work += batch * count * row_blocks * self.profile.split_row_block_us * 1e-6
            if not family.computes_none:
                rates = self._rates(kind, backend, params, n, whole_site)
                work += batch * count * self._head_seconds(rates, kind, params, n, causal, head_dim)
                work += row_blocks * rates.chunk_us * 1e-6
        gpu = work + launches + (self.profile.fa4.launch_us * 1e-6 if on_fa4 else 0.0)
        if host is None:
            return gpu, on_fa4
        dynamic = sum(get_pattern(kind).dynamic for kind, _, _ in groups)
        return max(gpu, host.sparse_seconds(triton_launches + on_fa4, dynamic, on_fa4)), on_fa4

    def attention_record(self, sites: list, n: int) -> dict:
        """Predicted attention time of ``sites`` (plan sites, as grouped now) at length ``n``,
        against the same sites dense: what the plan summary and the report quote."""
        seconds = dense = 0.0
        for site in sites:
            groups = [(g.pattern, g.params, len(g.heads)) for g in site.instance_groups()]
            causal = site.effective_causal()
            seconds += self.site_seconds(groups, n, causal, site.head_dim)
            dense += self.site_seconds([("dense", {}, site.num_heads)], n, causal, site.head_dim)
        return {"target": self.target.name, "seq_len": n, "calibrated": self.profile.calibrated,
                "attention_seconds": seconds, "dense_attention_seconds": dense,
                "predicted_attention_speedup": dense / seconds if seconds > 0 else math.inf}

    def linear_speedup(self, structure: str, out_features: int, in_features: int, level: float, tokens: int,
                       dtype: torch.dtype) -> tuple[float, str]:
        """Predicted speedup over dense of one linear pruned to ``level``, and why."""
        from sparsec.analysis.linear_costs import MIN_SPEEDUP, predicted_speedup, sparse_kernel
        from sparsec.weights.storage import Layout

        layout = Layout(structure, out_features, in_features)
        if level <= 0:
            return 1.0, "dense"
        if self.target.device_type != "cuda":
            return 1.0, f"{self.target.name}: sparse_linear runs the reference kernel (decompress, dense matmul)"
        kernel = sparse_kernel(layout)
        if kernel is None:
            return 1.0, f"no sparse GPU kernel for {structure} at {out_features}x{in_features}"
        if dtype not in (torch.float16, torch.bfloat16):
            return 1.0, f"{kernel} runs fp16 / bf16 weights; {dtype} runs dense"
        speedup = predicted_speedup(layout, level, tokens)
        if speedup is None or speedup < MIN_SPEEDUP:
            return 1.0, f"{kernel} is not {MIN_SPEEDUP}x faster than dense at {tokens} tokens (measured table)"
        return speedup, f"{kernel}, {speedup:.2f}x at {tokens} tokens (measured table)"

    def linear_seconds(self, out_features: int, in_features: int, tokens: int, speedup: float = 1.0) -> float:
        """``tokens`` rows through an ``out x in`` linear at the dense rate, divided by ``speedup``."""
        return 2.0 * tokens * in_features * out_features / (self.profile.dense.tflops * 1e12) / speedup

    def crossover_length(self, kind: str, params: dict, causal: bool, head_dim: int,
                         longest: int = 1 << 17) -> int | None:
        """The shortest length (to 1 %) from which the pattern is predicted faster per head
        than dense, searched up to ``longest``; None when it never is."""
        def faster(n: int) -> bool:
            return self.head_seconds(kind, params, n, causal, head_dim) < \
                self.head_seconds("dense", {}, n, causal, head_dim)

        n = 16
        while n <= longest and not faster(n):
            n *= 2
        if n > longest:
            return None
        low, high = n // 2, n                    # slower at low (or below the search), faster at high
        while high - low > max(1, low // 100):
            middle = (low + high) // 2
            low, high = (low, middle) if faster(middle) else (middle, high)
        return high


# -- attention backend per group ------------------------------------------------------------

FA4_HEAD_DIMS = (64, 128, 256)
FA4_BLOCK_M = 128           # runtime/fa4.BLOCK_M


def fa4_key_block(arch: str, head_dim: int) -> int:
    """FA4's sparse key block on ``arch``: its sm90 tile_n, 80 at head dim 256 and 128 below
    (flash-attn-4 4.0.0b36; ``runtime/fa4.key_block`` reads it from FA4 at run time, and a GPU
    test checks the two agree), 128 on newer chips."""
    return 80 if arch == "sm90" and head_dim == 256 else 128


def attention_backend(arch: str, kind: str, head_dim: int) -> str:
    """The kernel a head group of ``kind`` runs on a GPU of ``arch`` (``"sm90"``): ``"fa4"``
    (FlashAttention-4 block-sparse, :mod:`sparsec.runtime.fa4`) or ``"triton"``.

    FA4 for the static families (their mask is index arithmetic or a lookup table, each
    checked against the reference on an H200: tests/test_fa4.py) at head dims 64, 128 and
    256 on sm90 and newer, where its measured rates (``fa4`` in the target's calibration)
    are 1.3-1.5x Triton's; Triton for dynamic families (``vertical_slash``: its per-input
    estimate builds the Triton kernel's lookup tables), other head dims and older chips."""
    newer = arch.startswith("sm") and arch[2:].isdigit() and int(arch[2:]) >= 90
    static = not get_pattern(kind).dynamic
    return "fa4" if newer and static and head_dim in FA4_HEAD_DIMS else "triton"
