"""``sparsec bench cost-model``: time attention kernels on a GPU and fit the cost model's constants.

Run on the machine whose target profile you calibrate (the run ships as
``sparsec/data/attention_calibration_<target>.json``, which :mod:`sparsec.analysis.cost_model`
reads; ``docs/benchmarks.md`` records each calibration and its fit)::

    sparsec bench cost-model --json calibration.json     # measure here (a CUDA GPU), then fit
    sparsec bench cost-model --refit                     # fit the packaged h100 measurements again
    sparsec bench cost-model --refit h200                # ... or another packaged target's
    sparsec bench cost-model --refit calibration.json    # fit an earlier --json file (no GPU needed)
    sparsec bench cost-model --cpu --json calibration.json   # the cpu target, here (bench_cost_model_cpu.py)

What it measures (bf16, head_dim 128, batch 1, 32 heads, median of ``do_bench``):

1. dense causal ``F.scaled_dot_product_attention`` for N from 256 to 32768, with the
   backend torch picks (what sparsec's dense path runs) and with the flash backend forced;
2. block-sparse attention: FlexAttention with a sliding-window ``BlockMask`` (128 x 128
   blocks) at N = 4096 and 16384 over window widths;
3. launch overhead: host wall time per call of back-to-back eager calls at a tiny size
   (SDPA, FlexAttention, an empty Triton kernel), where the host, not the GPU, is the limit;
4. where FlashAttention-4 is installed (sm90+): sparsec's FA4 backend as it runs a
   ``sink_window`` group (per-head block tables and the generated mask_mod) at the same
   lengths and widths, the rates the cost model gives groups that FA4 serves;
5. host: the host time of one call of sparsec's ops (a dense site, a sparse site of one,
   two and one dynamic group, one on FA4) back to back at N = 128, where the host is the
   limit: what a site costs an eager model whose launches outpace the GPU;
6. dynamic: ``dynamic_blocks``' estimate (its row block mass kernel and the layout chosen from
   it; GPU time; keys of 8 heads) with 8 and 16 estimating rows a 64-row block at N = 8192 and 16384, where the
   GPU, not the host, bounds it (a dynamic group's host time is series 5's).

``--add-series host,dynamic --refit h200`` measures only the named series here and fits them
with the rest of the saved run.

Each series is fitted (least squares on relative residuals) to the cost model's form
``t = launch + computed_pairs * 4 * D / rate + query_block_rows * row_cost``, where
``query_block_rows = heads * ceil(N / 128)``; the table prints measured against fitted times.
"""
from __future__ import annotations

import argparse
import time

import torch

from sparsec.analysis.measurements import packaged
from sparsec.tools.saved_runs import add_saved_run_arguments, saved_or_measured, write_run

HEAD_DIM = 128
HEADS = 32
BLOCK = 128
DENSE_LENGTHS = [256, 512, 1024, 2048, 4096, 8192, 16384, 32768]
SPARSE_LENGTHS = [4096, 16384]
WINDOWS = [128, 256, 512, 1024, 2048, 4096, 8192, 16384]


def packaged_measurements(target: str = "h100") -> dict | None:
    """The measurements shipped for ``target`` (``sparsec/data/attention_calibration_<target>.json``;
    the ``h100`` profile of :mod:`sparsec.analysis.cost_model` is fitted to h100's), or None."""
    return packaged("attention_calibration", target)


def _qkv(n: int, heads: int = HEADS, batch: int = 1):
    shape = (batch, heads, n, HEAD_DIM)
    return [torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(3)]


def _median_ms(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")


def _host_us_per_call(fn, calls: int = 2000) -> float:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def causal_pairs(n: int) -> int:
    return n * (n + 1) // 2


def measure_dense() -> list[dict]:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows = []
    for n in DENSE_LENGTHS:
        q, k, v = _qkv(n)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            ms = _median_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
        default_ms = _median_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
        flops = 4 * HEAD_DIM * HEADS * causal_pairs(n)
        rows.append({"n": n, "ms": ms, "default_backend_ms": default_ms, "flops": flops,
                     "tflops": flops / ms / 1e9})
        print(f"dense n={n:6d} flash {ms:8.3f} ms ({flops / ms / 1e9:6.1f} TFLOP/s)  default {default_ms:8.3f} ms",
              flush=True)
    return rows


def _window_row(kernel: str, n: int, window: int, blocks: int, block_flops: int, ms: float) -> dict:
    """One measured window of a block-sparse series (printed as it is taken)."""
    flops = blocks * block_flops
    print(f"{kernel:<5} n={n:6d} window={window:6d} blocks={blocks:6d} {ms:8.3f} ms "
          f"({flops / ms / 1e9:6.1f} TFLOP/s over computed blocks)", flush=True)
    return {"n": n, "window": window, "blocks": blocks, "query_blocks": n // BLOCK, "ms": ms, "flops": flops,
            "tflops": flops / ms / 1e9}


def measure_sparse() -> list[dict]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    # One mask function for every window (the width is read from a tensor), so the compiled
    # FlexAttention kernel is reused instead of recompiled per window.
    width = torch.tensor(0, device="cuda")

    def window_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < width)

    torch._dynamo.config.cache_size_limit = 64
    rows = []
    flex = torch.compile(flex_attention, dynamic=False)
    for n in SPARSE_LENGTHS:
        q, k, v = _qkv(n)
        for window in [w for w in WINDOWS if w <= n]:
            width.fill_(window)
            block_mask = create_block_mask(window_mod, None, None, n, n, device="cuda", BLOCK_SIZE=BLOCK)
            blocks = int(block_mask.kv_num_blocks.sum())
            if block_mask.full_kv_num_blocks is not None:
                blocks += int(block_mask.full_kv_num_blocks.sum())
            ms = _median_ms(lambda: flex(q, k, v, block_mask=block_mask))
            rows.append(_window_row("flex", n, window, blocks, 4 * HEAD_DIM * HEADS * BLOCK * BLOCK, ms))
    return rows


def measure_fa4() -> list[dict]:
    """Block-sparse FA4 through sparsec's backend (:mod:`sparsec.runtime.fa4`) over the
    widths of :func:`measure_sparse`; ``[]`` where FA4 does not run."""
    from sparsec.ir.plan import HeadGroup
    from sparsec.runtime import fa4

    if not fa4.supported(torch.device("cuda")):
        print("fa4: not installed or not sm90+, no FA4 series", flush=True)
        return []
    rows = []
    for n in SPARSE_LENGTHS:
        q, k, v = _qkv(n)
        out = torch.empty_like(q)
        for window in [w for w in WINDOWS if w <= n]:
            group = HeadGroup("sink_window", {"sink": [1, 0], "window": [window, 0]}, list(range(HEADS)))
            tables = fa4.build_tables([group], HEADS, n, n, True, fa4.key_block(HEAD_DIM, q.device), q.device)
            per_head = HEADS // tables.full_count.shape[1]          # 1 row: broadcast over the heads
            blocks = int(tables.partial_count.sum() + tables.full_count.sum()) * per_head
            launch = fa4.site_call(q, k, v, HEAD_DIM ** -0.5, True, [group])
            ms = _median_ms(lambda: launch(q, k, v, out))
            rows.append(_window_row("fa4", n, window, blocks, 4 * HEAD_DIM * fa4.BLOCK_M * tables.block_n, ms))
    return rows


def measure_launch() -> dict:
    import torch.nn.functional as F
    import triton
    import triton.language as tl
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    @triton.jit
    def _empty_kernel(x_ptr, N: tl.constexpr):
        pid = tl.program_id(0)
        tl.store(x_ptr + pid, pid)

    q, k, v = _qkv(64, heads=1)
    flex = torch.compile(flex_attention, dynamic=False)
    block_mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, 64, 64, device="cuda",
                                   BLOCK_SIZE=BLOCK)
    x = torch.zeros(1, device="cuda", dtype=torch.int32)
    result = {
        "sdpa_us": _host_us_per_call(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
        "flex_us": _host_us_per_call(lambda: flex(q, k, v, block_mask=block_mask)),
        "triton_empty_us": _host_us_per_call(lambda: _empty_kernel[(1,)](x, N=1)),
        "sdpa_gpu_ms": _median_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
    }
    print("launch (host us per eager call): " + ", ".join(f"{k}={v:.2f}" for k, v in result.items()), flush=True)
    return result


HOST_N = 128


def measure_host() -> dict:
    """Host us per call of sparsec's attention ops as a compiled model calls them (without the
    dispatcher, :mod:`sparsec.runtime.fast_graph`; series 5); Triton alone except the FA4 row."""
    from sparsec.ir.ops import dense_attention_op
    from sparsec.ir.plan import HeadGroup, encode_groups
    from sparsec.runtime import fa4, kernels
    from sparsec.runtime.device_kernels import sparse_attention_direct

    q, k, v = _qkv(HOST_N)
    scale, heads, half = HEAD_DIM ** -0.5, list(range(HEADS)), HEADS // 2

    def window(members: list[int], width: int) -> HeadGroup:
        return HeadGroup("sink_window", {"sink": [4, 0], "window": [width, 0]}, members)

    def site_us(groups: list[HeadGroup]) -> float:
        table = encode_groups(groups)
        return _host_us_per_call(lambda: sparse_attention_direct(q, k, v, None, scale, True, table))

    dynamic = HeadGroup("vertical_slash", {"queries": 64, "vertical": [16, 0], "slash": [16, 0]}, heads)
    with kernels.fa4_enabled(False):
        result = {"dense_site_us": _host_us_per_call(lambda: dense_attention_op(q, k, v, None, scale, True)),
                  "one_group_site_us": site_us([window(heads, 64)]),
                  "two_group_site_us": site_us([window(heads[:half], 64), window(heads[half:], 32)]),
                  "dynamic_site_us": site_us([dynamic])}
    if fa4.supported(q.device):
        with kernels.fa4_enabled(True):       # a direct call: the family rule puts the group on FA4
            result["fa4_site_us"] = site_us([window(heads, 64)])
    print("host (us per call): " + ", ".join(f"{k}={v:.1f}" for k, v in result.items()), flush=True)
    return result


DYNAMIC_LENGTHS = [8192, 16384]
DYNAMIC_SAMPLES = [8, 16]


def measure_dynamic() -> list[dict]:
    """Series 6: ``dynamic_blocks``' estimate over every head, GPU time (see the module docstring)."""
    from sparsec.codegen.triton.block_mass import dynamic_blocks_estimate
    from sparsec.patterns import get_pattern
    from sparsec.patterns.base import N

    family = get_pattern("dynamic_blocks")
    heads = torch.arange(HEADS, device="cuda")
    rows = []
    for n in DYNAMIC_LENGTHS:
        q, k, _ = _qkv(n)
        k = k[:, : HEADS // 4].contiguous()          # GQA 4:1, as Llama's
        for samples in DYNAMIC_SAMPLES:
            params = {"block": 64, "samples": samples, "share": 0.95, "density": [0.3, n, 0]}
            queries = family.estimating_rows(params, n, q.device)
            ms = _median_ms(lambda: dynamic_blocks_estimate(params, q, k, heads, queries, HEAD_DIM ** -0.5, True))
            rows.append({"pattern": "dynamic_blocks", "n": n, "samples": samples,
                         "elements": HEADS * len(queries) * n,
                         "flops": HEADS * float(family.overhead_expr(params, HEAD_DIM, True).subs(N, n)), "ms": ms})
            print(f"dynamic_blocks estimate n={n} samples={samples}: {ms:.3f} ms", flush=True)
    return rows


def fit_host(host: dict) -> dict:
    """The cost model's host terms (``HostCosts``) from series 5."""
    one = host["one_group_site_us"]
    return {"dense_site_us": host["dense_site_us"], "sparse_site_us": one,
            "group_us": max(host["two_group_site_us"] - one, 0.0),
            "dynamic_group_us": max(host["dynamic_site_us"] - one, 0.0),
            "fa4_us": max(host.get("fa4_site_us", one) - one, 0.0)}


def fit_dynamic(rows: list[dict], sparse: dict) -> float:
    """Picoseconds of GPU time per (head, estimating query, key) element of a dynamic group's
    estimate beyond its FLOPs at the sparse kernels' rate, which the cost model counts too
    (series 6; least squares on relative residuals, through 0)."""
    import numpy as np

    times = np.array([r["ms"] * 1e-3 for r in rows])
    beyond = times - np.array([r["flops"] for r in rows]) / (sparse["tflops"] * 1e12)
    elements = np.array([r["elements"] for r in rows], float)
    per_element = float((elements * beyond / times ** 2).sum() / (elements ** 2 / times ** 2).sum())
    return max(per_element, 0.0) * 1e12


def _row_blocks(row: dict) -> int:
    return HEADS * -(-row["n"] // BLOCK)


def fit_relative(seconds: list[float], terms: list[list[float]]) -> list[float]:
    """Coefficients ``c`` of ``t = c[0] + sum(c[i] * terms[i - 1])`` by least squares on relative
    residuals (each row weighted by 1 / its measured time); the fixed cost ``c[0]`` is kept
    >= 0 (no launch is free: the other terms are fitted alone)."""
    import numpy as np

    times = np.array(seconds)
    design = np.stack([np.ones(len(times)), *(np.array(term, float) for term in terms)], axis=1) / times[:, None]
    solution, *_ = np.linalg.lstsq(design, np.ones_like(times), rcond=None)
    if solution[0] < 0:
        solution, *_ = np.linalg.lstsq(design[:, 1:], np.ones_like(times), rcond=None)
        solution = np.concatenate([[0.0], solution])
    return [float(x) for x in solution]


def fit_series(rows: list[dict], key: str = "ms") -> dict:
    """``t = launch + flops / rate + row_blocks * row_cost`` (:func:`fit_relative`)."""
    launch, per_flop, per_row_block = fit_relative([r[key] * 1e-3 for r in rows], [
        [r["flops"] for r in rows], [_row_blocks(r) for r in rows]])
    return {"launch_us": launch * 1e6, "tflops": 1e-12 / per_flop, "row_block_us": per_row_block * 1e6}


def predict_ms(fitted: dict, row: dict) -> float:
    return (fitted["launch_us"] * 1e-6 + row["flops"] / (fitted["tflops"] * 1e12)
            + _row_blocks(row) * fitted["row_block_us"] * 1e-6) * 1e3


def fit(data: dict) -> dict:
    """Fit every series of a measurement record: ``dense`` (the backend torch picks: the
    cost model's dense rates), ``dense_flash`` (flash forced, for comparison), ``sparse``
    and, where measured, ``fa4``."""
    fitted = {"dense": fit_series(data["dense"], "default_backend_ms"),
              "dense_flash": fit_series(data["dense"], "ms"),
              "sparse": fit_series(data["sparse"])}
    if data.get("fa4"):
        fitted["fa4"] = fit_series(data["fa4"])
    if data.get("host"):
        fitted["host"] = fit_host(data["host"])
    if data.get("dynamic"):
        fitted["dynamic_estimate_ps"] = fit_dynamic(data["dynamic"], fitted["sparse"])
    return fitted


def format_fit(data: dict, fitted: dict) -> str:
    lines = [f"{name:<12} rate {f['tflops']:7.1f} TFLOP/s, row cost {f['row_block_us']:.4f} us, "
             f"launch {f['launch_us']:.1f} us" for name, f in fitted.items() if name in SERIES]
    if "host" in fitted:
        lines.append("host         " + ", ".join(f"{k} {v:.1f}" for k, v in fitted["host"].items()))
    if "dynamic_estimate_ps" in fitted:
        lines.append(f"dynamic      estimate {fitted['dynamic_estimate_ps']:.2f} ps per (head, query, key) "
                     "beyond its FLOPs")
    lines += ["", f"{'series':<12} {'n':>6} {'window':>6} {'measured ms':>12} {'fitted ms':>10} {'ratio':>6}"]
    series = [("dense", "default_backend_ms", data["dense"]), ("dense_flash", "ms", data["dense"]),
              ("sparse", "ms", data["sparse"]), ("fa4", "ms", data.get("fa4", []))]
    for name, key, rows in series:
        for r in rows:
            predicted = predict_ms(fitted[name], r)
            lines.append(f"{name:<12} {r['n']:>6} {r.get('window', '-'):>6} {r[key]:>12.3f} {predicted:>10.3f} "
                         f"{r[key] / predicted:>6.2f}")
    return "\n".join(lines)


def measure() -> dict:
    """Every series on this machine's first CUDA GPU."""
    import triton

    if not torch.cuda.is_available():
        raise SystemExit("sparsec bench cost-model needs a CUDA GPU to measure (--refit fits saved measurements)")
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    print(f"device {props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, "
          f"triton {triton.__version__}", flush=True)
    return {"device": props.name, "torch": torch.__version__, "triton": triton.__version__,
            "head_dim": HEAD_DIM, "heads": HEADS, "batch": 1, "dtype": "bfloat16", "block": BLOCK,
            **{name: measure_series() for name, measure_series in MEASURED.items()}}


MEASURED = {"dense": measure_dense, "sparse": measure_sparse, "launch": measure_launch, "fa4": measure_fa4,
            "host": measure_host, "dynamic": measure_dynamic}
SERIES = ("dense", "dense_flash", "sparse", "fa4")       # fitted to the launch + work + rows form


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_saved_run_arguments(parser, "--refit", "attention_calibration", "fit earlier measurements",
                            "the measurements and the fit")
    parser.add_argument("--cpu", action="store_true",
                        help="the cpu target: time sparsec's CPU attention path here (with --refit cpu: fit the "
                             "packaged CPU run); see sparsec/tools/bench_cost_model_cpu.py")
    parser.add_argument("--add-series", metavar="NAME[,NAME]",
                        help=f"measure only these series here ({', '.join(MEASURED)}) and fit them with the "
                             "rest of the --refit run")


def _run_cpu(args: argparse.Namespace) -> int:
    from sparsec.tools import bench_cost_model_cpu as cpu

    data = saved_or_measured(args.refit, "attention_calibration", cpu.measure)
    if "split" not in data:
        raise SystemExit(f"--cpu --refit {args.refit}: not a CPU run (no split series); "
                         "fit the packaged one with --cpu --refit cpu, or a --cpu --json file")
    # Not measured by this run: the dynamic layout cost is carried over from the shipped fit.
    kept = {"dynamic_layout_ns": packaged_measurements("cpu")["fit"]["dynamic_layout_ns"]}
    data["fit"] = cpu.fit(data, kept)
    print(cpu.format_fit(data, data["fit"]))
    write_run(args.json, data)
    return 0


def run(args: argparse.Namespace) -> int:
    if args.cpu:
        return _run_cpu(args)
    names = args.add_series.split(",") if args.add_series else []
    if names and (args.refit is None or not set(names) <= set(MEASURED)):
        raise SystemExit(f"--add-series takes {', '.join(MEASURED)} and needs --refit RUN for the other series")
    data = saved_or_measured(args.refit, "attention_calibration", measure)
    data.update({name: MEASURED[name]() for name in names})
    data["fit"] = fit(data)
    print(format_fit(data, data["fit"]))
    write_run(args.json, data)
    return 0
