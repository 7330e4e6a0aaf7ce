"""``sparsec bench onnx``: onnxruntime on the CPU, a Llama-style model with sparse attention
exported in custom mode (``ai.sparsec::SparseAttention``, block-sparse kernel) against the
dense ONNX export of the original model, end to end, at several sequence lengths from one
export each::

    sparsec bench onnx                                 # N = 1024, 4096; 4 layers; medians of 5
    sparsec bench onnx --lengths 1024 --repeat 3

The model: hidden 512, 8 query heads of 64 sharing 2 key/value heads, MLP 1408, fp32,
random weights. The sparse plan is planted (as the tests do), not searched: window, sink +
window and block top-k heads at an attention density of about 20% of the causal matrix.
Dense baselines: the exporter's default (opset 20, attention as MatMul / Softmax) and
opset 23 (onnxruntime's fused ``Attention`` op). Runs are interleaved, so load from other
work on the machine slows every model alike; prints per length each model's median
latency, the speed-ups, the density and the sparse model's error against the compiled
PyTorch model.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

VOCAB = 1024


def block_topk_params(grid: int = 16, fraction: float = 0.15, seed: int = 0) -> dict:
    """A causal block layout keeping about ``fraction`` of the lower triangle's blocks."""
    generator = torch.Generator().manual_seed(seed)
    blocks = [[qb, kb] for qb in range(grid) for kb in range(qb + 1)
              if kb == 0 or torch.rand((), generator=generator) < fraction]
    return {"block": 64, "grid": [grid, grid], "blocks": blocks}


def planted_patterns() -> dict[int, tuple[str, dict]]:
    """Head -> (pattern, params): the first GQA group (heads 0-3) one window, the second
    split between sink + window and a block top-k layout."""
    window = ("window", {"window": [0, 0.1]})
    sink_window = ("sink_window", {"sink": [64, 0], "window": [0, 0.08]})
    block_topk = ("block_topk", block_topk_params())
    return {0: window, 1: window, 2: window, 3: window, 4: sink_window, 5: sink_window,
            6: block_topk, 7: block_topk}


def build_model(layers: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=512, intermediate_size=1408,
                         num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2,
                         max_position_embeddings=8192, use_cache=False, attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


def _interleaved_medians(runs: dict, repeat: int) -> dict:
    """Median wall seconds of each ``name -> (session, feeds)``, runs interleaved so that
    a machine shared with other work slows every model alike."""
    times = {name: [] for name in runs}
    for name, (session, feeds) in runs.items():
        session.run(None, feeds)                                  # warm-up: layouts, allocations
    for _ in range(repeat):
        for name, (session, feeds) in runs.items():
            start = time.perf_counter()
            session.run(None, feeds)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def mean_density(patterns: dict, n: int) -> float:
    from sparsec.patterns import get_pattern

    return statistics.mean(get_pattern(kind).density(params, n, True) for kind, params in patterns.values())


def _export_dense(model: torch.nn.Module, example: dict, path: Path, opset: int | None) -> Path:
    torch.onnx.export(model, (), kwargs=example, f=str(path), dynamo=True, external_data=False, opset_version=opset,
                      dynamic_shapes={"input_ids": {1: torch.export.Dim("sequence", max=8192)}})
    return path


def run_benchmark(lengths=(1024, 4096), layers: int = 4, repeat: int = 5, threads: int = 2,
                  workdir: "str | Path | None" = None) -> list[dict]:
    """Export the models once, time them at each length; one result dict per length.

    Two dense baselines: the exporter's default (opset 20: attention as MatMul / Softmax)
    and opset 23, where attention is onnxruntime's fused ``Attention`` op.
    """
    import numpy as np

    import sparsec
    from sparsec.codegen.onnx import export_onnx
    from sparsec.passes.canonicalize import Canonicalize
    from sparsec.passes.lower import Lower
    from sparsec.runtime.ort import ort_feeds, ort_session
    from sparsec.testing.plant_patterns import PlantPatterns

    torch.set_num_threads(threads)
    workdir = Path(workdir or tempfile.mkdtemp(prefix="sparsec_bench_onnx_"))
    model, patterns = build_model(layers), planted_patterns()
    example = {"input_ids": torch.randint(0, VOCAB, (1, 256))}
    compiled = sparsec.compile(model, example, passes=[Canonicalize(), PlantPatterns([patterns]), Lower()])
    paths = {"sparse": export_onnx(compiled.graph_module, (), example, compiled.plan, workdir / "sparse.onnx"),
             "dense": _export_dense(model, example, workdir / "dense.onnx", None),
             "dense_opset23": _export_dense(model, example, workdir / "dense_opset23.onnx", 23)}
    sessions = {name: ort_session(path, intra_op_num_threads=threads) for name, path in paths.items()}
    results = []
    for n in lengths:
        inputs = {"input_ids": torch.randint(0, VOCAB, (1, n))}
        runs = {name: (session, ort_feeds(session, (), inputs)) for name, session in sessions.items()}
        with torch.no_grad():
            expected = compiled(**inputs)[0].numpy()
        error = float(np.abs(sessions["sparse"].run(None, runs["sparse"][1])[0] - expected).max())
        medians = _interleaved_medians(runs, repeat)
        results.append({"n": n, **{f"{name}_s": seconds for name, seconds in medians.items()},
                        "density": mean_density(patterns, n), "max_abs_error": error})
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096], help="sequence lengths")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per model and length (median)")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")


def run(args: argparse.Namespace) -> int:
    results = run_benchmark(args.lengths, args.layers, args.repeat, args.threads)
    print(f"onnxruntime CPU, {args.threads} threads, Llama-style {args.layers} layers, batch 1, fp32; "
          f"median of {args.repeat}")
    print(f"{'N':>6} {'density':>8} {'sparse ms':>10} {'dense ms':>10} {'speed-up':>9} "
          f"{'dense op23 ms':>14} {'speed-up':>9} {'max |err|':>10}")
    for r in results:
        print(f"{r['n']:>6} {r['density']:>8.3f} {r['sparse_s'] * 1e3:>10.1f} {r['dense_s'] * 1e3:>10.1f} "
              f"{r['dense_s'] / r['sparse_s']:>8.2f}x {r['dense_opset23_s'] * 1e3:>14.1f} "
              f"{r['dense_opset23_s'] / r['sparse_s']:>8.2f}x {r['max_abs_error']:>10.2e}")
    return 0
