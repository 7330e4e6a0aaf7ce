"""Measure attention kernel times on a GPU and fit the cost-model constants.

Run on the machine whose profile you calibrate (sparsec/cost_model.py records the result):

    python scripts/calibrate_cost_model.py --out calibration.json

What it measures (bf16, head_dim 128, batch 1, 32 heads, median of ``do_bench``):

1. dense causal ``F.scaled_dot_product_attention`` for N from 256 to 32768, with the
   backend torch picks (what sparsec's dense path runs) and with the flash backend forced;
2. block-sparse attention: FlexAttention with a sliding-window ``BlockMask`` (128 x 128
   blocks) at N = 4096 and 16384 over window widths;
3. launch overhead: host wall time per call of back-to-back eager calls at a tiny size
   (SDPA, FlexAttention, an empty Triton kernel), where the host, not the GPU, is the limit.

Each series is fitted (least squares on relative residuals) to the cost model's form
``t = launch + computed_pairs * 4 * D / rate + query_block_rows * row_cost``, where
``query_block_rows = heads * ceil(N / 128)``. Prints measured against fitted times and
writes everything as JSON; ``--refit file.json`` redoes the fit without a GPU.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

HEAD_DIM = 128
HEADS = 32
BLOCK = 128
DENSE_LENGTHS = [256, 512, 1024, 2048, 4096, 8192, 16384, 32768]
SPARSE_LENGTHS = [4096, 16384]
WINDOWS = [128, 256, 512, 1024, 2048, 4096, 8192, 16384]
# One mask function for every window (the width is read from a tensor), so the compiled
# FlexAttention kernel is reused instead of recompiled per window.
_WINDOW = None


def _window_mod(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx < _WINDOW)


def _qkv(n: int, heads: int = HEADS, batch: int = 1):
    shape = (batch, heads, n, HEAD_DIM)
    return [torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(3)]


def _median_ms(fn) -> float:
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


@triton.jit
def _empty_kernel(x_ptr, N: tl.constexpr):
    pid = tl.program_id(0)
    tl.store(x_ptr + pid, pid)


def causal_pairs(n: int) -> int:
    return n * (n + 1) // 2


def _fit(columns: list[np.ndarray], times: np.ndarray) -> np.ndarray:
    """Least squares on relative residuals: each row weighted by 1 / its measured time."""
    design = np.stack(columns, axis=1) / times[:, None]
    coef, *_ = np.linalg.lstsq(design, np.ones_like(times), rcond=None)
    return coef


def measure_dense() -> list[dict]:
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


def measure_sparse() -> list[dict]:
    global _WINDOW
    _WINDOW = torch.tensor(0, device="cuda")
    torch._dynamo.config.cache_size_limit = 64
    rows = []
    flex = torch.compile(flex_attention, dynamic=False)
    for n in SPARSE_LENGTHS:
        q, k, v = _qkv(n)
        for window in [w for w in WINDOWS if w <= n]:
            _WINDOW.fill_(window)
            block_mask = create_block_mask(_window_mod, None, None, n, n, device="cuda", BLOCK_SIZE=BLOCK)
            blocks = int(block_mask.kv_num_blocks.sum())
            if block_mask.full_kv_num_blocks is not None:
                blocks += int(block_mask.full_kv_num_blocks.sum())
            ms = _median_ms(lambda: flex(q, k, v, block_mask=block_mask))
            pairs = blocks * BLOCK * BLOCK
            flops = 4 * HEAD_DIM * HEADS * pairs
            rows.append({"n": n, "window": window, "blocks": blocks, "query_blocks": n // BLOCK,
                         "ms": ms, "flops": flops, "tflops": flops / ms / 1e9})
            print(f"flex  n={n:6d} window={window:6d} blocks={blocks:6d} {ms:8.3f} ms "
                  f"({flops / ms / 1e9:6.1f} TFLOP/s over computed blocks)", flush=True)
    return rows


def measure_launch() -> dict:
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


def _model_columns(rows: list[dict]) -> list[np.ndarray]:
    """The cost model's terms: one launch, FLOPs of computed pairs, query-block rows."""
    flops = np.array([r["flops"] for r in rows], float)
    row_blocks = np.array([HEADS * -(-r["n"] // BLOCK) for r in rows], float)
    return [np.ones_like(flops), flops, row_blocks]


def fit_series(rows: list[dict], key: str = "ms") -> dict:
    """``t = launch + flops / rate + row_blocks * row_cost`` by relative least squares."""
    times = np.array([r[key] * 1e-3 for r in rows])
    launch, per_flop, per_row_block = _fit(_model_columns(rows), times)
    return {"launch_us": launch * 1e6, "tflops": 1e-12 / per_flop, "row_block_us": per_row_block * 1e6}


def predict_ms(fitted: dict, row: dict) -> float:
    row_blocks = HEADS * -(-row["n"] // BLOCK)
    return (fitted["launch_us"] * 1e-6 + row["flops"] / (fitted["tflops"] * 1e12)
            + row_blocks * fitted["row_block_us"] * 1e-6) * 1e3


def report(data: dict) -> dict:
    """Fit every series and print measured against fitted times."""
    fitted = {"dense": fit_series(data["dense"], "default_backend_ms"),
              "dense_flash": fit_series(data["dense"], "ms"),
              "sparse": fit_series(data["sparse"])}
    print("\nfit:", json.dumps(fitted, indent=1))
    print(f"\n{'series':<12} {'n':>6} {'window':>6} {'measured ms':>12} {'fitted ms':>10} {'ratio':>6}")
    series = [("dense", "default_backend_ms", data["dense"]), ("dense_flash", "ms", data["dense"]),
              ("sparse", "ms", data["sparse"])]
    for name, key, rows in series:
        for r in rows:
            pred = predict_ms(fitted[name], r)
            print(f"{name:<12} {r['n']:>6} {r.get('window', '-'):>6} {r[key]:>12.3f} {pred:>10.3f} "
                  f"{r[key] / pred:>6.2f}")
    return fitted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="calibration.json")
    parser.add_argument("--refit", help="fit the measurements of an earlier --out file (no GPU needed)")
    args = parser.parse_args()
    if args.refit:
        with open(args.refit) as f:
            report(json.load(f))
        return
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    print(f"device {props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, "
          f"triton {triton.__version__}", flush=True)
    data = {"device": props.name, "torch": torch.__version__, "triton": triton.__version__,
            "head_dim": HEAD_DIM, "heads": HEADS, "batch": 1, "dtype": "bfloat16", "block": BLOCK,
            "dense": measure_dense(), "sparse": measure_sparse(), "launch": measure_launch()}
    data["fit"] = report(data)
    with open(args.out, "w") as f:
        json.dump(data, f, indent=1)


if __name__ == "__main__":
    main()
