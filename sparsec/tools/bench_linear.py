"""``sparsec bench linear``: sparse linears against cuBLAS at Llama-7B shapes, on one GPU.

For weights ``[out, in]`` in {4096x4096, 11008x4096, 4096x11008} and token counts ``M`` in
{1, 16, 256, 4096, 16384}, bf16, it times ``F.linear`` with

- ``dense``: the dense weight (cuBLAS);
- ``2:4``: a 2:4 weight as a semi-structured sparse tensor (``to_sparse_semi_structured``,
  cuSPARSELt; its CUTLASS backend runs on sm8x only);
- ``2:4-cslt``: the same weight through ``torch._cslt_sparse_mm`` directly (no tensor
  subclass), to see what the subclass costs;
- ``block32@L`` / ``block64@L``: the Triton block-sparse matmul at level ``L`` in {0.5, 0.75}.

``ms`` are ``triton.testing.do_bench`` medians (events around each call, so host overhead
counts where the host is slower than the GPU: what an eager model sees); ``graph_ms`` time
the same calls replayed from a CUDA graph (GPU time alone). Weights and inputs rotate over
``COPIES`` sets so that no run reads its weight from L2. Every variant is first checked
against the masked dense product. Prints the speedup table (eager times) in the form of
``MEASURED_SPEEDUP`` in :mod:`sparsec.analysis.linear_costs`, then the time tables::

    sparsec bench linear --json sparse_linear.json    # measure (a CUDA GPU)
    sparsec bench linear --report                     # the tables of the packaged h100 run
    sparsec bench linear --report h200                # ... or another packaged target's
"""
from __future__ import annotations

import argparse
import itertools
import json

import torch
import torch.nn.functional as F

from sparsec.analysis.measurements import packaged
from sparsec.ir.inputs import relative_l2
from sparsec.tools.saved_runs import add_saved_run_arguments, saved_or_measured, write_run

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]   # (out_features, in_features)
TOKENS = [1, 16, 256, 4096, 16384]
VARIANTS = ["dense", "2:4", "2:4-cslt", "block64@0.5", "block64@0.75", "block32@0.5", "block32@0.75"]
COPIES = 4


def packaged_measurements(target: str = "h100") -> dict | None:
    """The run shipped for ``target`` (``sparsec/data/sparse_linear_<target>.json``; h100's is
    the table ``MEASURED_SPEEDUP`` in :mod:`sparsec.analysis.linear_costs` holds), or None."""
    return packaged("sparse_linear", target)


def _cusparselt_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """``x @ W^T`` with ``packed = torch._cslt_compress(W)``, cuSPARSELt called directly."""
    m = x.shape[0]
    pad = (-m) % 8   # cuSPARSELt's dense operand takes rows in multiples of 8
    padded = F.pad(x, (0, 0, 0, pad)) if pad else x
    # W @ x^T is [N, M]; transpose_result writes it as [M, N] row-major.
    return torch._cslt_sparse_mm(packed, padded.t(), transpose_result=True)[:m]


def _operands(out_features: int, in_features: int, structure: str, level: float, direct: bool = False):
    """COPIES (dense masked weight, operand) pairs for one variant."""
    from sparsec.weights import block_csr, compress, parse_structure

    parsed = parse_structure(structure)
    operands = []
    for _ in range(COPIES):
        weight = torch.randn(out_features, in_features, device="cuda", dtype=torch.bfloat16)
        keep = parsed.mask(torch.rand_like(weight, dtype=torch.float32), level, "row")
        values, mask, layout = compress(weight, keep, parsed)
        masked = weight * keep
        if parsed.kind == "n:m":
            operand = torch._cslt_compress(masked) if direct else torch.sparse.to_sparse_semi_structured(masked)
        else:
            operand = (values, *block_csr(mask, layout), parsed.block)
        operands.append((masked, operand))
    return operands


def _runner(variant: str, operand, out_features: int):
    from sparsec.codegen.triton.block_sparse_matmul import block_sparse_matmul

    if variant == "2:4-cslt":
        return lambda x: _cusparselt_linear(x, operand)
    if variant in ("dense", "2:4"):
        return lambda x: F.linear(x, operand)
    values, crow, col, block = operand
    return lambda x: block_sparse_matmul(x, values, crow, col, None, block, out_features)


def measure(variants: list[str]) -> list[dict]:
    """One row per shape, token count and variant; a failing variant is recorded, not raised."""
    rows = []
    for (out_features, in_features), tokens in itertools.product(SHAPES, TOKENS):
        xs = [torch.randn(tokens, in_features, device="cuda", dtype=torch.bfloat16) for _ in range(COPIES)]
        for variant in variants:
            try:
                rows.append(_measure(variant, out_features, in_features, tokens, xs))
            except Exception as error:  # noqa: BLE001 — one failing variant must not lose the others
                rows.append({"out": out_features, "in": in_features, "tokens": tokens, "variant": variant,
                             "ms": float("nan"), "error": f"{type(error).__name__}: {error}"[:300]})
            print(json.dumps(rows[-1]), flush=True)
        del xs
        torch.cuda.empty_cache()
    return rows


def _measure(variant: str, out_features: int, in_features: int, tokens: int, xs: list[torch.Tensor]) -> dict:
    from triton.testing import do_bench, do_bench_cudagraph

    if variant == "dense":
        weights = [torch.randn(out_features, in_features, device="cuda", dtype=torch.bfloat16)
                   for _ in range(COPIES)]
        pairs = [(w, w) for w in weights]
    else:
        structure, _, level = variant.partition("@")
        pairs = _operands(out_features, in_features, structure.replace("-cslt", ""), float(level or 0.5),
                          direct=structure == "2:4-cslt")
    runners = [_runner(variant, operand, out_features) for _, operand in pairs]
    error = relative_l2(xs[0].float() @ pairs[0][0].float().T, runners[0](xs[0]))
    calls = itertools.cycle(list(zip(runners, xs)))

    def step():
        run, x = next(calls)
        run(x)

    ms = do_bench(step, warmup=25, rep=100, return_mode="median")
    try:
        graph_ms = do_bench_cudagraph(step, rep=50, return_mode="median")
    except Exception as failure:  # noqa: BLE001 — not every library call can be captured
        graph_ms = f"{type(failure).__name__}: {failure}"[:200]
    row = {"out": out_features, "in": in_features, "tokens": tokens, "variant": variant, "ms": ms,
           "graph_ms": graph_ms, "rel_error": error,
           "tflops": 2 * tokens * out_features * in_features / ms / 1e9}
    if variant.startswith("block") and tokens > 16:
        from sparsec.codegen.triton.block_sparse_matmul import _block_sparse_matmul_tuned

        row["config"] = str(_block_sparse_matmul_tuned.best_config)
    return row


def _time(row: dict, key: str) -> float:
    value = row.get(key)
    return value if isinstance(value, float) else float("nan")


def format_times(rows: list[dict], key: str = "ms") -> str:
    """Per shape and token count: dense time, then each sparse variant's time / speedup."""
    variants = list(dict.fromkeys(r["variant"] for r in rows if r["variant"] != "dense"))
    dense = {(r["out"], r["in"], r["tokens"]): _time(r, key) for r in rows if r["variant"] == "dense"}
    lines = [f"{'in->out':>12} {'M':>6} {'dense ms':>9} " + " ".join(f"{v:>14}" for v in variants),
             f"({key}; sparse columns: median ms / speedup over dense)"]
    for (out_features, in_features, tokens), base in dense.items():
        cells = []
        for variant in variants:
            ms = next((_time(r, key) for r in rows if (r["out"], r["in"], r["tokens"], r["variant"])
                       == (out_features, in_features, tokens, variant)), float("nan"))
            cells.append(f"{ms:7.4f}/{base / ms:5.2f}x")
        lines.append(f"{f'{in_features}->{out_features}':>12} {tokens:>6} {base:9.4f} "
                     + " ".join(f"{c:>14}" for c in cells))
    return "\n".join(lines)


def speedup_table(rows: list[dict]) -> dict:
    """``MEASURED_SPEEDUP``'s form: kernel -> (out, in) -> tokens -> dense ms / sparse ms,
    eager times; the direct cuSPARSELt call is left out (the runtime uses the subclass)."""
    dense = {(r["out"], r["in"], r["tokens"]): r["ms"] for r in rows if r["variant"] == "dense"}
    table: dict = {}
    for r in rows:
        if r["variant"] in ("dense", "2:4-cslt") or "error" in r:
            continue
        name = r["variant"]
        if "@" in name:
            structure, level = name.split("@")
            name = f"{structure}@{float(level):.2f}"
        shape = (r["out"], r["in"])
        table.setdefault(name, {}).setdefault(shape, {})[r["tokens"]] = round(dense[shape + (r["tokens"],)] / r["ms"], 2)
    return table


def report(data: dict) -> None:
    print(f"device: {data['device']}")
    print("\nMEASURED_SPEEDUP = " + repr(speedup_table(data["rows"])))
    print("\n" + format_times(data["rows"], "ms"))
    print("\n" + format_times(data["rows"], "graph_ms"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_saved_run_arguments(parser, "--report", "sparse_linear", "print the tables of an earlier run",
                            "every measurement and the speedup table")


def measure_run() -> dict:
    """Every variant on this machine's CUDA GPU: the rows and their speedup table."""
    if not torch.cuda.is_available():
        raise SystemExit("sparsec bench linear needs a CUDA GPU to measure (--report prints saved measurements)")
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"cuSPARSELt available: {torch.backends.cusparselt.is_available()}")
    rows = measure(VARIANTS)
    return {"device": torch.cuda.get_device_name(), "rows": rows,
            "speedup": {name: {f"{o}x{i}": by_tokens for (o, i), by_tokens in shapes.items()}
                        for name, shapes in speedup_table(rows).items()}}


def run(args: argparse.Namespace) -> int:
    data = saved_or_measured(args.report, "sparse_linear", measure_run)
    write_run(args.json, data)
    report(data)
    return 0
