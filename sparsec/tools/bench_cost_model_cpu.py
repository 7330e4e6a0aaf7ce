"""``sparsec bench cost-model --cpu``: time sparsec's CPU attention path and fit the ``cpu``
target's constants (shipped as ``sparsec/data/attention_calibration_cpu.json``).

SmolLM2's attention shape (9 query heads, 3 key/value heads, head_dim 64), fp32, batch 1,
causal, this machine's torch threads, medians of ``REPS`` calls:

1. dense: ``F.scaled_dot_product_attention`` (what dense heads and dense sites run) over N;
2. sparse: ``sparsec.runtime.cpu_attention.sparse_attention`` of one sink_window group (the
   first query head, or the first key/value head's three) over N and window widths, so the
   fit separates a group's fixed cost from its per-head work;
3. split: a site's dense heads beside sparse one-head groups, against its two parts timed
   alone: what splitting a site costs beyond them (the dense heads are gathered, run apart
   from their key/value group and scattered back), per dense head and 128-row block.

Series 1 and 2 are fitted to the cost model's form (``launch + pairs * 4 * D / rate +
head_row_blocks * row_cost * D / 128``, and for the sparse path ``+ chunks * chunk_cost``, a
group's cost per 128-row chunk: one SDPA call serves all its heads; least squares on relative
residuals), series 3 to a cost per (dense head, row block).
"""
from __future__ import annotations

import math
import statistics
import time

import torch

from sparsec.analysis.cost_model import REFERENCE_HEAD_DIM, ROW_BLOCK, head_flops
from sparsec.ir.plan import HeadGroup

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64
LENGTHS = [256, 512, 1024, 2048, 4096]
WINDOWS = [16, 64, 256, 1024, 4096]
REPS = 9


def _qkv(n: int):
    return (torch.randn(1, HEADS, n, HEAD_DIM), torch.randn(1, KV_HEADS, n, HEAD_DIM),
            torch.randn(1, KV_HEADS, n, HEAD_DIM))


def _median_ms(fn) -> float:
    fn()
    times = []
    for _ in range(REPS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _sink_window(window: int, heads: list[int]) -> HeadGroup:
    return HeadGroup("sink_window", {"sink": [1, 0], "window": [window, 0]}, heads)


def _flops(group: HeadGroup, n: int) -> float:
    return len(group.heads) * head_flops(group.pattern, group.params, n, True, HEAD_DIM)


def measure_dense() -> list[dict]:
    import torch.nn.functional as F
    rows = []
    for n in LENGTHS:
        q, k, v = _qkv(n)
        ms = _median_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
        rows.append({"n": n, "heads": HEADS, "ms": ms, "flops": _flops(HeadGroup("dense", {}, list(range(HEADS))), n)})
        print(f"dense  n={n:5d} {ms:8.2f} ms", flush=True)
    return rows


def measure_sparse() -> list[dict]:
    from sparsec.runtime import cpu_attention
    rows = []
    for n in LENGTHS:
        q, k, v = _qkv(n)
        for window in [w for w in WINDOWS if w < n] + [n]:
            for heads in ([0], [0, 1, 2]):
                group = _sink_window(window, heads)
                ms = _median_ms(lambda: cpu_attention.sparse_attention(q, k, v, None, HEAD_DIM ** -0.5, True, [group]))
                rows.append({"n": n, "window": window, "heads": len(heads), "ms": ms, "flops": _flops(group, n)})
                print(f"sparse n={n:5d} window={window:5d} heads={len(heads)} {ms:8.2f} ms", flush=True)
    return rows


def measure_split() -> list[dict]:
    from sparsec.runtime import cpu_attention
    rows = []
    for n in LENGTHS[1:]:
        q, k, v = _qkv(n)
        for dense_heads in (8, 6, 3):
            dense = HeadGroup("dense", {}, list(range(dense_heads)))
            sparse = [_sink_window(64 * (1 + i), [h]) for i, h in enumerate(range(dense_heads, HEADS))]

            def run(groups):
                return _median_ms(lambda: cpu_attention.sparse_attention(q, k, v, None, HEAD_DIM ** -0.5, True, groups))

            site, alone, rest = run([dense, *sparse]), run([dense]), run(sparse)
            rows.append({"n": n, "dense_heads": dense_heads, "ms": site, "parts_ms": alone + rest})
            print(f"split  n={n:5d} dense heads={dense_heads} site {site:8.2f} ms, parts {alone:.2f} + {rest:.2f}",
                  flush=True)
    return rows


def _row_blocks(row: dict) -> float:
    return row["heads"] * math.ceil(row["n"] / ROW_BLOCK) * HEAD_DIM / REFERENCE_HEAD_DIM


def _chunks(row: dict) -> int:
    return math.ceil(row["n"] / ROW_BLOCK)


def fit_series(rows: list[dict], chunks: bool) -> dict:
    """``t = launch + flops / rate + row_blocks * row_cost [+ chunks * chunk_cost]``: the cost
    model's form at head_dim 64; ``chunks``: a cost per group and 128-row chunk too (the sparse
    path runs one SDPA call per chunk for all of a group's heads)."""
    from sparsec.tools.bench_cost_model import fit_relative
    terms = [[r["flops"] for r in rows], [_row_blocks(r) for r in rows]]
    launch, per_flop, per_row_block, *per_chunk = fit_relative(
        [r["ms"] * 1e-3 for r in rows], terms + ([[_chunks(r) for r in rows]] if chunks else []))
    fitted = {"launch_us": launch * 1e6, "tflops": 1e-12 / per_flop, "row_block_us": max(per_row_block, 0.0) * 1e6}
    return {**fitted, "chunk_us": max(per_chunk[0], 0.0) * 1e6} if chunks else fitted


def fit_split(rows: list[dict]) -> float:
    """Microseconds per (dense head, 128-row block) a split site costs beyond its parts."""
    extra = sum(max(r["ms"] - r["parts_ms"], 0.0) * 1e3 for r in rows)
    return extra / sum(r["dense_heads"] * math.ceil(r["n"] / ROW_BLOCK) for r in rows)


def fit(data: dict, kept: dict) -> dict:
    """The ``cpu`` fit; ``kept``: constants carried over from the previous fit (not measured here).
    ``min_site_saving``: a sparse site must be predicted to save what the sparse path's slowest
    tenth of points took beyond their fitted time, so that a site the fit puts just below dense
    does not run slower than dense."""
    import numpy as np
    fitted = {"dense": fit_series(data["dense"], chunks=False), "sparse": fit_series(data["sparse"], chunks=True),
              "split_row_block_us": fit_split(data["split"]), **kept}
    slow = float(np.quantile([r["ms"] / predict_ms(fitted["sparse"], r) for r in data["sparse"]], 0.9))
    return {**fitted, "min_site_saving": round(max(0.0, 1 - 1 / slow), 3)}


def predict_ms(fitted: dict, row: dict) -> float:
    return (fitted["launch_us"] * 1e-6 + row["flops"] / (fitted["tflops"] * 1e12)
            + _row_blocks(row) * fitted["row_block_us"] * 1e-6 + _chunks(row) * fitted.get("chunk_us", 0.0) * 1e-6) * 1e3


def format_fit(data: dict, fitted: dict) -> str:
    lines = [f"{name:<7} rate {fitted[name]['tflops'] * 1e3:6.1f} GFLOP/s, row cost {fitted[name]['row_block_us']:.2f} us,"
             f" launch {fitted[name]['launch_us']:.1f} us, chunk {fitted[name].get('chunk_us', 0.0):.1f} us"
             for name in ("dense", "sparse")]
    lines.append(f"split   {fitted['split_row_block_us']:.2f} us per dense head and row block")
    lines.append(f"a sparse site must be predicted to save {fitted['min_site_saving']:.0%} of its dense time")
    lines.append(f"{'series':<7} {'n':>5} {'window':>6} {'heads':>5} {'ms':>9} {'fitted':>9} {'ratio':>6}")
    for name in ("dense", "sparse"):
        for r in data[name]:
            predicted = predict_ms(fitted[name], r)
            lines.append(f"{name:<7} {r['n']:>5} {r.get('window', '-'):>6} {r['heads']:>5} {r['ms']:>9.2f} "
                         f"{predicted:>9.2f} {r['ms'] / predicted:>6.2f}")
    return "\n".join(lines)


def measure() -> dict:
    """Every series on this machine's CPU."""
    import os
    torch.manual_seed(0)
    print(f"CPU, {torch.get_num_threads()} torch threads, torch {torch.__version__}, load {os.getloadavg()[0]:.1f}",
          flush=True)
    with torch.no_grad():
        return {"device": f"CPU, {torch.get_num_threads()} threads (torch {torch.__version__})",
                "how": "sparsec bench cost-model --cpu (sparsec/tools/bench_cost_model_cpu.py)",
                "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "dtype": "float32",
                "dense": measure_dense(), "sparse": measure_sparse(), "split": measure_split()}
