#!/usr/bin/env python3
"""Every kernel config on every benchmark case: which config each family wants (issue #5).

For each case of ``sparsec bench attention`` (one group of all heads), times the
generated kernel at each config given (not only the arch's candidates), beside
FlexAttention on the same mask and dense SDPA, and checks each config's output against
FlexAttention's.

    python3 scripts/bench_configs.py --n 16384 --cases window-512 block_topk \
        --configs m128n128w8s3 m64n64w4s3tma [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import re

import torch
import torch.nn.functional as F
import triton.testing
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from sparsec.bench import CASES, FLEX_BLOCK, _computed_blocks, _flex_mask_mod, bench_groups
from sparsec.codegen.triton.configs import KernelConfig
from sparsec.runtime import kernels


def parse_config(tag: str) -> KernelConfig:
    match = re.fullmatch(r"m(\d+)n(\d+)w(\d+)s(\d+)(tma)?", tag)
    if not match:
        raise SystemExit(f"config {tag!r}: expected e.g. m128n64w8s3 or m64n64w4s3tma")
    return KernelConfig(*(int(g) for g in match.groups()[:4]), tma=bool(match.group(5)))


def median_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, nargs="+", default=[16384])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=32)
    parser.add_argument("--cases", nargs="+", default=["window-512", "sink_window", "multi_diagonal",
                                                       "block_topk", "window-N/4"], choices=CASES)
    parser.add_argument("--configs", nargs="+", required=True)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch._dynamo.config.cache_size_limit = 1024
    flex = torch.compile(flex_attention, dynamic=False)
    configs = [parse_config(tag) for tag in args.configs]
    rows = []
    for n in args.n:
        q = torch.randn(1, args.heads, n, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(1, args.kv_heads, n, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        scale, gqa = 128 ** -0.5, args.heads != args.kv_heads
        dense_ms = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa))
        dense_tflops = 4 * 128 * args.heads * n * (n + 1) // 2 / dense_ms * 1e-9
        for case in args.cases:
            (group,) = bench_groups(case, n, args.heads)
            block_mask = create_block_mask(_flex_mask_mod([group], n, args.heads, "cuda", {}), None, None, n, n,
                                           device="cuda", BLOCK_SIZE=FLEX_BLOCK, _compile=True)
            flops = 4 * 128 * _computed_blocks(block_mask, 1, args.heads)
            expected = flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)
            flex_ms = median_ms(lambda: flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa))
            prepared = kernels._Group(q, k, v, None, scale, True, group)
            for config in configs:
                row = {"case": case, "n": n, "config": config.tag, "flex_ms": flex_ms, "dense_ms": dense_ms}
                try:
                    launch = prepared.prepare(config)
                    out = torch.full_like(q, float("nan"))
                    launch(q, k, v, out, None)
                    row["max_diff"] = float((out.float() - expected.float()).abs().max())
                    row["ms"] = median_ms(lambda: launch(q, k, v, out, None))
                    row["tflops"] = flops / row["ms"] * 1e-9
                    row["vs_dense"] = row["tflops"] / dense_tflops
                    row["vs_flex"] = flex_ms / row["ms"]
                except Exception as error:          # e.g. out of shared memory for this tile
                    row["error"] = f"{type(error).__name__}: {str(error)[:160]}"
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(f"\n{'case':<15} {'N':>6} {'config':<15} {'ms':>7} {'TF/s':>5} {'flex ms':>7} {'vs dense':>8} "
          f"{'vs flex':>7} {'maxdiff':>7}")
    for r in rows:
        if "ms" in r:
            print(f"{r['case']:<15} {r['n']:>6} {r['config']:<15} {r['ms']:>7.3f} {r['tflops']:>5.0f} "
                  f"{r['flex_ms']:>7.3f} {r['vs_dense']:>8.2f} {r['vs_flex']:>7.2f} {r['max_diff']:>7.3f}")
        else:
            print(f"{r['case']:<15} {r['n']:>6} {r['config']:<15} {r['error'][:70]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
