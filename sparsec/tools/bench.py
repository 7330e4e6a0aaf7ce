"""``sparsec bench attention``: sparsec's generated kernels against dense
``F.scaled_dot_product_attention`` (FlashAttention) and FlexAttention
(``torch.compile(flex_attention)`` with a ``BlockMask`` built from the same pattern).

For each case (a pattern family and parameters, or a mixed layer of several groups) at
each length: medians of ``triton.testing.do_bench``, effective TFLOP/s and the ratios.
Two FLOP counts: *blocks*, ``4 * D`` per (query, key) pair of every 128 x 128 block the
FlexAttention ``BlockMask`` computes ("TFLOP/s on computed blocks"; for dense
causal attention, the ``N(N+1)/2`` pairs of the causal triangle), and *kept*, per pair
the pattern keeps. ``sparsec/flex`` is FlexAttention's time over sparsec's (> 1: sparsec
is faster). The dynamic rows (``vertical_slash``, ``dynamic_blocks``) time sparsec's whole op
(estimation, index build, kernel) against FlexAttention's call alone, with its mask built
beforehand.

Where FlashAttention-4 is installed, sparsec is timed three ways: as a model compiled for
``--target`` runs it (each group on the backend that target's cost model picks, the kernel
called without the custom-op dispatcher, as a compiled model's graph does), with Triton
alone (``triton ms``) and with FA4 for every group it can take (``all-fa4 ms``); FA4 is also
called directly where the pattern is a plain window.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import random

import torch
import torch.nn.functional as F

from sparsec.patterns import get_pattern
from sparsec.ir.plan import HeadGroup, encode_groups
from sparsec.ir.targets import running_for

FLEX_BLOCK = 128


def bench_groups(case: str, n: int, num_heads: int) -> list[HeadGroup]:
    """The group table of a benchmark case at length ``n`` (every head one pattern, or mixed)."""
    heads = list(range(num_heads))
    if case == "mixed":
        quarter = num_heads // 4
        return [HeadGroup(*_case_params(name, n), heads[i * quarter:(i + 1) * quarter] if i < 3 else
                          heads[3 * quarter:])
                for i, name in enumerate(["sink_window", "window-512", "vertical_stripe", "block_topk"])]
    return [HeadGroup(*_case_params(case, n), heads)]


def _case_params(case: str, n: int) -> tuple[str, dict]:
    if case == "window-512":
        return "window", {"window": [512, 0]}
    if case == "window-N/4":
        return "window", {"window": [0, 0.25]}
    if case == "sink_window":
        return "sink_window", {"sink": [128, 0], "window": [512, 0]}
    if case == "vertical_stripe":
        return "vertical_stripe", {"columns": list(range(0, 8192, 256)), "window": [512, 0]}
    if case == "multi_diagonal":
        return "multi_diagonal", {"period": [0, 1 / 8], "width": [64, 0], "count": 0}
    if case == "block_topk":
        rng = random.Random(0)                   # ~15% of the causal lower triangle at 32 x 32
        blocks = [[i, j] for i in range(32) for j in range(i + 1) if rng.random() < 0.15]
        return "block_topk", {"block": 128, "grid": [32, 32], "blocks": blocks}
    if case == "vertical_slash":
        return "vertical_slash", {"vertical": [256, 0.01], "slash": [256, 0.02], "queries": 64}
    if case == "dynamic_blocks":
        return "dynamic_blocks", {"block": 64, "samples": 8, "share": 0.9, "density": [0.3, n, 0]}
    raise ValueError(f"unknown benchmark case {case!r}; choose from {CASES}")


CASES = ["window-512", "window-N/4", "sink_window", "vertical_stripe", "multi_diagonal", "block_topk",
         "vertical_slash", "dynamic_blocks", "mixed"]


# -- FlexAttention mask_mods of the same patterns ------------------------------------------

def _flex_keep(group: HeadGroup, n: int, device, estimate=None):
    """``keep(b, h, q, kv)`` of one group at length ``n`` (n_q = n_k), before the causal cut:
    the family's FlexAttention mask_mod (``Pattern.mask_mod``, its one index-arithmetic
    mask), or a dynamic family's mask_mod of its ``estimate``."""
    family = get_pattern(group.pattern)
    if family.dynamic:
        return family.dynamic_mask_mod(*estimate, n, n, causal=False)
    return family.mask_mod(group.params, n, n, causal=False, device=device)


def _flex_mask_mod(groups: list[HeadGroup], n: int, num_heads: int, device, estimates: dict):
    keeps = [_flex_keep(g, n, device, estimates.get(i)) for i, g in enumerate(groups)]
    if len(groups) == 1:
        keep = keeps[0]
        return lambda b, h, q, kv: keep(b, h, q, kv) & (q >= kv)
    group_of_head = torch.zeros(num_heads, dtype=torch.int32, device=device)
    for i, group in enumerate(groups):
        group_of_head[group.heads] = i

    def mask_mod(b, h, q, kv):
        kept = keeps[-1](b, h, q, kv)
        for i in range(len(groups) - 2, -1, -1):
            kept = torch.where(group_of_head[h] == i, keeps[i](b, h, q, kv), kept)
        return kept & (q >= kv)
    return mask_mod


def flex_block_mask(groups: list[HeadGroup], n: int, batch: int, num_heads: int, device, estimates: dict):
    """The FlexAttention ``BlockMask`` of a case: static groups from each family's exact
    block classes (the tables sparsec gives FA4, :func:`sparsec.runtime.fa4.build_tables`),
    so no ``[heads, n, n]`` token mask is ever evaluated (at 64k, 32 heads, that is 512 GiB
    in fp32: the benchmark once died asking for it); a dynamic group's mask from its estimate."""
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask

    from sparsec.runtime import fa4

    mask_mod = _flex_mask_mod(groups, n, num_heads, device, estimates)
    if estimates:
        return create_block_mask(mask_mod, batch, num_heads, n, n, device=device, BLOCK_SIZE=FLEX_BLOCK,
                                 _compile=True)
    tables = fa4.build_tables(groups, num_heads, n, n, True, FLEX_BLOCK, device)
    return BlockMask.from_kv_blocks(tables.partial_count, tables.partial_index, tables.full_count,
                                    tables.full_index, BLOCK_SIZE=FLEX_BLOCK, mask_mod=mask_mod, seq_lengths=(n, n))


def _computed_blocks(block_mask, batch: int, num_heads: int) -> int:
    """(query, key) pairs in the blocks a BlockMask computes, over every batch and head."""
    blocks = block_mask.kv_num_blocks.sum().item()
    if block_mask.full_kv_num_blocks is not None:
        blocks += block_mask.full_kv_num_blocks.sum().item()
    mask_batch, mask_heads = block_mask.kv_num_blocks.shape[:2]
    return int(blocks * FLEX_BLOCK * FLEX_BLOCK * (batch // mask_batch) * (num_heads // mask_heads))


# -- the benchmark --------------------------------------------------------------------------

def _median_ms(fn) -> float:
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def bench_case(case: str, n: int, num_heads: int, num_kv_heads: int, head_dim: int, batch: int,
               dtype: torch.dtype, flex=None, dense_ms: float | None = None, target: str = "h200") -> dict:
    """One row: sparsec (each group on the backend ``target``'s cost model picks, as a model
    compiled for it runs), dense SDPA and FlexAttention times on fresh random inputs."""
    from sparsec.codegen.triton.generator import has_kernel
    from sparsec.runtime import kernels
    from sparsec.runtime.device_kernels import sparse_attention_direct

    device = torch.device("cuda")
    q = torch.randn(batch, num_heads, n, head_dim, device=device, dtype=dtype)
    k = torch.randn(batch, num_kv_heads, n, head_dim, device=device, dtype=dtype)
    v = torch.randn(batch, num_kv_heads, n, head_dim, device=device, dtype=dtype)
    scale = head_dim ** -0.5
    gqa = num_heads != num_kv_heads
    groups = bench_groups(case, n, num_heads)
    table = encode_groups(groups)

    def sparse():            # as a compiled model calls it: without the dispatcher (runtime/fast_graph.py)
        with running_for(target):
            return sparse_attention_direct(q, k, v, None, scale, True, table)

    tuned = len(kernels.tuning_log)
    out = sparse()                                        # first use: generate, compile, autotune
    row = {"case": case, "n": n, "heads": f"{num_heads}:{num_kv_heads}", "sparsec_ms": _median_ms(sparse),
           "autotune": [entry["timings_ms"] for entry in kernels.tuning_log[tuned:]]}
    if dense_ms is None:
        dense_ms = _median_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                                     enable_gqa=gqa))
    row["dense_ms"] = dense_ms
    dense_pairs = batch * num_heads * n * (n + 1) // 2
    row["dense_tflops"] = 4 * head_dim * dense_pairs / dense_ms * 1e-9

    estimates = {i: kernels.estimate_dynamic(q, k, group, scale, True)
                 for i, group in enumerate(groups) if get_pattern(group.pattern).dynamic}
    row["config"] = " ".join(kernels.chosen_config(q, k, v, None, scale, True, g).tag for g in groups
                             if has_kernel(g.pattern))
    block_mask = flex_block_mask(groups, n, batch, num_heads, device, estimates)
    pairs = _computed_blocks(block_mask, batch, num_heads)
    row["density"] = pairs / (batch * num_heads * n * n)
    row["sparsec_tflops"] = 4 * head_dim * pairs / row["sparsec_ms"] * 1e-9
    row["sparsec_vs_dense"] = row["sparsec_tflops"] / row["dense_tflops"]
    if flex is not None:
        def flex_call():
            return flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)
        row["flex_ms"] = _try_median(flex_call)
        if not math.isnan(row["flex_ms"]):
            row["max_abs_diff_vs_flex"] = float((flex_call().float() - out.float()).abs().max())
        row["flex_tflops"] = 4 * head_dim * pairs / row["flex_ms"] * 1e-9
        row["sparsec_vs_flex"] = row["flex_ms"] / row["sparsec_ms"]
        row["flex_flash_ms"] = _try_median(lambda: flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa,
                                                        kernel_options={"BACKEND": "FLASH"}))
    row.update(_fa4_rows(q, k, v, scale, groups, table, sparse))
    return row


def _try_median(fn) -> float:
    """The median time of ``fn``, or NaN (with the reason printed) when it cannot run."""
    try:
        fn()
        return _median_ms(fn)
    except Exception as error:             # a backend that refuses the case: a gap in the table
        print(f"# skipped: {type(error).__name__}: {str(error)[:160]}", flush=True)
        return math.nan


def _fa4_rows(q, k, v, scale: float, groups: list[HeadGroup], table: str, sparse) -> dict:
    """sparsec's Triton kernels alone (FA4 off), sparsec with FA4 for every group it can take
    (no target: the family rule alone), and FlashAttention-4 called directly, where the
    pattern has a direct FA4 spelling (a sliding band: native window_size)."""
    from sparsec.runtime import fa4, kernels
    from sparsec.runtime.device_kernels import sparse_attention_direct
    if not fa4.available(q.device):
        return {}
    with kernels.fa4_enabled(False):
        triton_ms = _try_median(sparse)
    with kernels.fa4_enabled(True):
        fa4_ms = _try_median(lambda: sparse_attention_direct(q, k, v, None, scale, True, table))
    interface = fa4.interface()
    direct = math.nan
    width = fa4.native_window(groups, q.shape[1], k.shape[2])
    if width is not None:
        direct = _try_median(lambda: interface.flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale, causal=True,
            window_size=(width - 1, 0)))
    return {"sparsec_triton_ms": triton_ms, "sparsec_fa4_ms": fa4_ms, "fa4_direct_ms": direct}


def format_table(rows: list[dict]) -> str:
    header = (f"{'case':<16} {'N':>6} {'H:Hkv':>6} {'dens':>5} {'sparsec ms':>10} {'TF/s':>5} {'triton ms':>9} "
              f"{'all-fa4 ms':>10} "
              f"{'dense ms':>9} {'TF/s':>5} {'flex ms':>8} {'flash ms':>8} {'fa4 ms':>7} {'vs dense':>8} "
              f"{'vs flex':>7} {'vs flash':>8} {'maxdiff':>7} config")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['case']:<16} {r['n']:>6} {r['heads']:>6} {r['density']:>5.3f} {r['sparsec_ms']:>10.3f} "
            f"{r['sparsec_tflops']:>5.0f} {r.get('sparsec_triton_ms', math.nan):>9.3f} "
            f"{r.get('sparsec_fa4_ms', math.nan):>10.3f} {r['dense_ms']:>9.3f} "
            f"{r['dense_tflops']:>5.0f} {r.get('flex_ms', math.nan):>8.3f} {r.get('flex_flash_ms', math.nan):>8.3f} "
            f"{r.get('fa4_direct_ms', math.nan):>7.3f} {r['sparsec_vs_dense']:>8.2f} "
            f"{r.get('sparsec_vs_flex', math.nan):>7.2f} "
            f"{r.get('flex_flash_ms', math.nan) / r['sparsec_ms']:>8.2f} "
            f"{r.get('max_abs_diff_vs_flex', math.nan):>7.3f} {r.get('config', '')}")
    return "\n".join(lines)


def bench_attention(args: argparse.Namespace) -> list[dict]:
    """Run the attention benchmark described by parsed ``args``; print the table, return the rows."""
    if not torch.cuda.is_available():
        raise SystemExit("sparsec bench attention needs a CUDA GPU")
    flex = None
    if not args.no_flex:
        from torch import _dynamo
        from torch.nn.attention.flex_attention import flex_attention

        # Every case's mask_mod is a new function: let each compile rather than fall back to eager.
        _dynamo.config.cache_size_limit = 1024
        _dynamo.config.accumulated_cache_size_limit = 4096
        # fullgraph: a graph break would run part of flex_attention outside its fused kernel,
        # on dense [heads, N, N] scores; an error leaves a gap in the table instead.
        flex = torch.compile(flex_attention, dynamic=False, fullgraph=True)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    rows = []
    for n in args.n:
        for kv_heads in args.kv_heads:
            dense_ms = None
            for case in args.cases:
                row = bench_case(case, n, args.heads, kv_heads, args.head_dim, args.batch, dtype, flex, dense_ms,
                                 args.target)
                dense_ms = row["dense_ms"]
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "dtype": args.dtype, "head_dim": args.head_dim, "batch": args.batch, "rows": rows}, f, indent=1)
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, nargs="+", default=[4096, 16384, 65536], help="sequence lengths")
    parser.add_argument("--cases", nargs="+", default=CASES, choices=CASES)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, nargs="+", default=[32, 8], help="KV heads (GQA when fewer)")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention (no torch.compile)")
    parser.add_argument("--target", default="h200",
                        help="the compile target whose cost model picks each group's backend (FA4 or Triton)")
    parser.add_argument("--json", help="also write the rows to this JSON file")


# ``sparsec bench <suite>``: (suite, module, help); each module has add_arguments(parser) and run(args).
SUITES = [
    ("attention", "sparsec.tools.bench", "generated kernels vs dense SDPA vs FlexAttention"),
    ("e2e", "sparsec.tools.bench_e2e", "Llama-style prefill: compiled sparse vs eager dense vs torch.compile"),
    ("quality", "sparsec.tools.bench_quality", "a real trained model (SmolLM2, MiniLM): dense vs compiled "
                                               "perplexity, top-1 agreement, KL, passkey retrieval"),
    ("cost-model", "sparsec.tools.bench_cost_model", "time attention kernels on this GPU and fit the cost "
                                                     "model's rates (--refit: fit saved measurements)"),
    ("linear", "sparsec.tools.bench_linear", "sparse linear kernels (2:4, block) vs cuBLAS at Llama-7B shapes"),
    ("onnx", "sparsec.tools.bench_onnx", "onnxruntime CPU: sparse custom-op export vs the dense export"),
    ("compile", "sparsec.tools.bench_compile", "compile time of SmolLM2 per pass on this machine"),
]


def add_parser(subparsers) -> None:
    """``sparsec bench attention|e2e|quality|cost-model|linear|onnx|compile ...`` (the CLI gathers sub-commands through this)."""
    bench = subparsers.add_parser("bench", help="benchmarks on a GPU")
    suites = bench.add_subparsers(dest="suite", required=True)
    for name, module_name, help_text in SUITES:
        module = importlib.import_module(module_name)
        suite = suites.add_parser(name, help=help_text)
        module.add_arguments(suite)
        suite.set_defaults(handler=module.run)


def run(args: argparse.Namespace) -> int:
    bench_attention(args)
    return 0
