"""``sparsec bench compile``: how long compiling SmolLM2 takes on this machine, per pass (the
numbers of docs/benchmarks.md, "Compile time (CPU)").

    sparsec bench compile --length 2048 --batches 2 [--layers 15] [--target h100]
        [--seq-len 8192] [--plan-out plan.json] [--profile out.prof]

Loads SmolLM2-135M-Instruct (fp32; :mod:`sparsec.testing.real_models`), keeps its first
``--layers`` layers, and compiles it with default settings on ``--batches`` windows of
``--length`` tokens of CPython text. Prints one JSON line: wall and CPU seconds of
``sparsec.compile``, the load average before and after (the machine may be shared), each
pass's seconds (a :class:`~sparsec.passes.infra.pass_manager.PassTimer`), the number of
sparse heads and the plan's measured error (verification's metric, value and top-1 agreement
on the calibration windows). ``--plan-out`` writes the plan (without ``extra``) to compare plans across commits.
``--time-sites`` (target cpu: this machine is the target) then times every site that runs
sparse heads alone, on random inputs at ``--length``: the CPU path of its groups against dense
SDPA of all its heads, in turn, medians of 5, beside what the cost model predicts for both.
"""
from __future__ import annotations

import argparse
import copy
import cProfile
import json
import os
import time

import torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--length", type=int, default=2048, help="calibration tokens per window")
    parser.add_argument("--batches", type=int, default=2, help="calibration windows")
    parser.add_argument("--layers", type=int, default=30, help="keep the model's first LAYERS layers")
    parser.add_argument("--target", default="cpu")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--plan-out", default=None, help="write the plan (without extra) here")
    parser.add_argument("--profile", default=None, help="write a cProfile of the compile here")
    parser.add_argument("--time-sites", action="store_true",
                        help="time each sparse site against dense SDPA here (target cpu)")


def time_sites(plan, n: int) -> dict:
    """Each site with sparse heads, sparse (``cpu_attention``) against dense SDPA at length
    ``n`` on random inputs (in turn, medians of 5 ms), and the cost model's two predictions."""
    import statistics

    from sparsec.analysis.cost_model import CostModel
    from sparsec.ir import reference
    from sparsec.runtime import cpu_attention

    model, rows = CostModel(plan.target), []
    for site in plan.attention:
        groups = site.instance_groups()
        if all(group.is_dense for group in groups):
            continue
        q = torch.randn(1, site.num_heads, n, site.head_dim)
        k, v = (torch.randn(1, site.num_kv_heads, n, site.head_dim) for _ in range(2))
        scale, causal, times = site.head_dim ** -0.5, site.effective_causal(), {"sparse": [], "dense": []}
        for _ in range(5):
            for name, call in (("sparse", lambda: cpu_attention.sparse_attention(q, k, v, None, scale, causal, groups)),
                               ("dense", lambda: reference.dense_attention(q, k, v, None, scale, causal))):
                start = time.perf_counter()
                call()
                times[name].append((time.perf_counter() - start) * 1e3)
        sizes = [(group.pattern, group.params, len(group.heads)) for group in groups]
        rows.append({"site": site.name, "sparse_ms": statistics.median(times["sparse"]),
                     "dense_ms": statistics.median(times["dense"]),
                     "predicted_sparse_ms": model.site_seconds(sizes, n, causal, site.head_dim) * 1e3,
                     "predicted_dense_ms": model.site_seconds([("dense", {}, site.num_heads)], n, causal,
                                                              site.head_dim) * 1e3})
    totals = {key: round(sum(row[key] for row in rows), 1)
              for key in ("sparse_ms", "dense_ms", "predicted_sparse_ms", "predicted_dense_ms")}
    return {"sites": len(rows), "slower_than_dense": sum(row["sparse_ms"] > row["dense_ms"] for row in rows),
            **totals, "dense_over_sparse": [round(row["dense_ms"] / row["sparse_ms"], 2) for row in rows]}


def run(args: argparse.Namespace) -> int:
    import sparsec
    from sparsec.passes.infra.pass_manager import PassTimer
    from sparsec.testing.real_models import load_smollm2, token_batches

    torch.set_num_threads(args.threads)
    model, tokenizer = load_smollm2()
    if args.layers < model.config.num_hidden_layers:
        model = copy.deepcopy(model)          # load_smollm2's model is shared within the process
        model.model.layers = model.model.layers[:args.layers]
        model.config.num_hidden_layers = args.layers
    windows = token_batches(tokenizer, "calibration", args.length, args.batches)
    timer = PassTimer()
    load_before = os.getloadavg()
    profile = cProfile.Profile() if args.profile else None
    if profile:
        profile.enable()
    wall, cpu = time.perf_counter(), time.process_time()
    compiled = sparsec.compile(model, {"input_ids": windows[0]}, calibration=[{"input_ids": w} for w in windows],
                               target=args.target, seq_len=args.seq_len, instruments=[timer])
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if profile:
        profile.disable()
        profile.dump_stats(args.profile)
    heads = [head for site in compiled.plan.attention for head in site.heads]
    verified = compiled.plan.verification
    print(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "handler"},
                      "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
                      "load_before": [round(x, 2) for x in load_before],
                      "load_after": [round(x, 2) for x in os.getloadavg()],
                      "passes": {name: round(s, 2) for name, s in timer.seconds.items()},
                      "outside_passes_s": round(wall - sum(timer.seconds.values()), 1),
                      "sparse_heads": sum(not head.is_dense for head in heads), "heads": len(heads),
                      "verified": verified and {"metric": verified.metric, "error": verified.measured,
                                                "top1": verified.top1_agreement,
                                                "within_tolerance": verified.within_tolerance},
                      **({"site_times": time_sites(compiled.plan, args.length)} if args.time_sites else {})}))
    if args.plan_out:
        plan = compiled.plan.to_dict()
        plan.pop("extra", None)
        with open(args.plan_out, "w") as out:
            json.dump(plan, out, indent=1, sort_keys=True, default=str)
    return 0
