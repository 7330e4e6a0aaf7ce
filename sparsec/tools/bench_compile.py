"""``sparsec bench compile``: how long compiling SmolLM2 takes on this machine, per pass (the
numbers of docs/benchmarks.md, "Compile time (CPU)").

    sparsec bench compile --length 2048 --batches 2 [--layers 15] [--target h100]
        [--seq-len 8192] [--plan-out plan.json] [--profile out.prof]

Loads SmolLM2-135M-Instruct (fp32; :mod:`sparsec.testing.real_models`), keeps its first
``--layers`` layers, and compiles it with default settings on ``--batches`` windows of
``--length`` tokens of CPython text. Prints one JSON line: wall and CPU seconds of
``sparsec.compile``, the load average before and after (the machine may be shared), each
pass's seconds (a :class:`~sparsec.passes.infra.pass_manager.PassTimer`) and the number of
sparse heads. ``--plan-out`` writes the plan (without ``extra``) to compare plans across commits.
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
    print(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "handler"},
                      "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
                      "load_before": [round(x, 2) for x in load_before],
                      "load_after": [round(x, 2) for x in os.getloadavg()],
                      "passes": {name: round(s, 2) for name, s in timer.seconds.items()},
                      "outside_passes_s": round(wall - sum(timer.seconds.values()), 1),
                      "sparse_heads": sum(not head.is_dense for head in heads), "heads": len(heads)}))
    if args.plan_out:
        plan = compiled.plan.to_dict()
        plan.pop("extra", None)
        with open(args.plan_out, "w") as out:
            json.dump(plan, out, indent=1, sort_keys=True, default=str)
    return 0
