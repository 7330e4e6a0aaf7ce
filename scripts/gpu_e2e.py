"""One device run for issue #5's end-to-end benchmark and two attention checks.

1. ``sparsec bench attention`` at N = 4096 (window-512, sink_window, block_topk; MHA 32
   heads, D = 128, bf16): the op's time against the kernel alone (the autotune's best
   config), since the per-signature launch cache (notes/kernels.md, v3); and window-512 at
   N = 16384. For dense SDPA and each case: measured time against the h100 cost model's
   prediction (:mod:`sparsec.cost_model`).
2. ``python -m sparsec.bench_e2e`` (32k prefill of the planted Llama) in a subprocess with
   the time left, so a hang or crash there keeps part 1; its JSON is rewritten after every
   step.

Everything goes under ``--out`` (default ``$OUT``): ``attention.json``, ``e2e.json``; the
tables are printed last.

    python scripts/gpu_e2e.py --budget-s 450 [-- extra sparsec.bench_e2e arguments]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from sparsec.bench import add_bench_attention_arguments, bench_attention, bench_groups, format_table
from sparsec.bench_e2e import format_table as format_e2e_table
from sparsec.cost_model import CostModel

ATTENTION_RUNS = [
    ["--n", "4096", "--cases", "window-512", "sink_window", "block_topk"],
    ["--n", "16384", "--cases", "window-512"],
]
HEADS, HEAD_DIM = 32, 128


def _attention_rows() -> list[dict]:
    parser = argparse.ArgumentParser()
    add_bench_attention_arguments(parser)
    rows = []
    for run in ATTENTION_RUNS:
        try:
            rows += bench_attention(parser.parse_args([*run, "--kv-heads", str(HEADS), "--heads", str(HEADS),
                                                       "--head-dim", str(HEAD_DIM), "--no-flex"]))
        except Exception:                              # keep the other run and the e2e part
            traceback.print_exc()
    return rows


def predictions(rows: list[dict]) -> list[dict]:
    """Per row: op and kernel-alone times, and the h100 cost model's predictions."""
    model = CostModel("h100")
    table = []
    for row in rows:
        groups = [(g.pattern, g.params, len(g.heads)) for g in bench_groups(row["case"], row["n"], HEADS)]
        kernel = min((ms for entry in row["autotune"] for ms in entry.values()), default=None)
        table.append({
            "case": row["case"], "n": row["n"], "op_ms": row["sparsec_ms"], "kernel_ms": kernel,
            "predicted_ms": model.site_seconds(groups, row["n"], True, HEAD_DIM) * 1e3,
            "dense_ms": row["dense_ms"],
            "dense_predicted_ms": model.site_seconds([("dense", {}, HEADS)], row["n"], True, HEAD_DIM) * 1e3})
    return table


def format_predictions(table: list[dict]) -> str:
    header = (f"{'case':<12} {'N':>6} {'op ms':>7} {'kernel ms':>9} {'op/kern':>7} {'pred ms':>7} {'meas/pred':>9} "
              f"{'dense ms':>8} {'dense pred':>10} {'meas/pred':>9}")
    lines = [header, "-" * len(header)]
    for r in table:
        kernel = r["kernel_ms"] or float("nan")
        lines.append(f"{r['case']:<12} {r['n']:>6} {r['op_ms']:>7.3f} {kernel:>9.3f} {r['op_ms'] / kernel:>7.2f} "
                     f"{r['predicted_ms']:>7.3f} {r['op_ms'] / r['predicted_ms']:>9.2f} {r['dense_ms']:>8.3f} "
                     f"{r['dense_predicted_ms']:>10.3f} {r['dense_ms'] / r['dense_predicted_ms']:>9.2f}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget of the whole script")
    parser.add_argument("--skip-attention", action="store_true")
    parser.add_argument("e2e_args", nargs=argparse.REMAINDER, help="after --: sparsec.bench_e2e arguments")
    args = parser.parse_args()
    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import triton
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"{device} torch {torch.__version__} triton {triton.__version__}", flush=True)

    table = []
    if not args.skip_attention:
        rows = _attention_rows()
        table = predictions(rows)
        (out / "attention.json").write_text(json.dumps({"rows": rows, "predictions": table}, indent=1))
        print(format_table(rows), flush=True)
    print(f"attention part: {time.perf_counter() - start:.0f} s", flush=True)

    e2e_json = out / "e2e.json"
    extra = [a for a in args.e2e_args if a != "--"]
    command = [sys.executable, "-m", "sparsec.bench_e2e", "--json", str(e2e_json), *extra]
    left = args.budget_s - (time.perf_counter() - start)
    try:
        subprocess.run(command, timeout=max(left, 1.0), env={**os.environ, "PYTHONUNBUFFERED": "1"})
    except subprocess.TimeoutExpired:
        print(f"e2e stopped at the budget ({left:.0f} s); partial results follow", flush=True)

    print("\n== attention: op vs kernel alone, measured vs cost model (h100), B=1 H=32 D=128 bf16 causal ==")
    print(format_predictions(table) if table else "(not run)")
    print("\n== end to end ==")
    print(format_e2e_table(json.loads(e2e_json.read_text())) if e2e_json.is_file() else "(no e2e results)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
