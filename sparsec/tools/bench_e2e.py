"""``sparsec bench e2e``: prefill of a causal LM compiled by sparsec, against the same model
run eagerly with dense SDPA and through ``torch.compile``.

The default model (``--model smollm2``) is SmolLM2-135M-Instruct, real and trained, on
CPython text (:mod:`sparsec.testing.real_models`): its dense bf16 logits agree with fp32
(the table prints that noise floor), so the sparse model's error beside each time means
something. ``--model planted`` is :func:`sparsec.testing.planted_llama` (RMSNorm, RoPE, GQA, SwiGLU, random
weights) built with ``long_context=True``: its planted windows hold at every length up to
128k and its dense bf16 logits agree with fp32 there, so its errors mean something too. In
every layer the query heads of all KV groups but the last are planted (28 of 32 at 32:8):
they attend in a window or to a sink plus a window, the kinds and windows cycling across
heads and layers; the last KV group stays dense.
sparsec calibrates at a short length, where a single length gives pattern sizes that do
not grow with N (``Elastic(a, 0)``), so the plan stays sparse at the benchmark length.

``--generate T`` (SmolLM2 only: the planted model is no Hugging Face model) also times
``model.generate()`` of ``T`` tokens after the ``--n`` prompt, dense and with the plan
attached (:func:`sparsec.attach`: sparse prefill, dense decode, the model's KV cache): time
to first token and decode tokens/s, and whether the generated tokens agree.

A fourth variant runs sparsec's rewritten graph through ``torch.compile`` (the sparse
attention op stays opaque; Inductor fuses the rest), as a user would deploy it.
Each variant is timed at batch 1 with CUDA events (``--reps`` calls after ``--warmup``,
median) and its peak memory is read from the allocator; a failing variant is reported
and the others still run. Then every variant is timed again side by side (called in turn
within each rep): the speed-ups come from these, so a drift in the host's pace between
variants does not. Logit errors are relative L2 against the eager dense model in
the same dtype, beside the dense model's own noise floor (dense in the benchmark dtype vs
dense fp32); above 0.05 the table says the model is unstable and its errors mean nothing
(SmolLM2 is past its 8k training length). ``--check-n`` measures the error at a
second length beside the error at ``--n``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import time
import traceback
from collections import Counter
from pathlib import Path

import torch

from sparsec.ir.targets import running_for

# The static kinds streaming heads have. planted_llama's separator stripes sit at content
# positions, which sparsec keeps dynamic (vertical_slash) or dense, not a static pattern.
PLANT_KINDS = ("window", "sink_window")
# Above this rel. L2 between dense low precision and dense fp32, a model's errors are noise.
STABLE_DENSE_ERROR = 0.05
TINY = {"model": "planted", "layers": 2, "heads": 4, "kv_heads": 2, "head_dim": 128, "hidden": 128, "intermediate": 256,
        "vocab": 256, "n": 1024, "check_n": 768, "calibration_length": 512, "windows": [16, 32],
        "dtype": "fp32", "target": "cpu", "reps": 1, "warmup": 0, "no_torch_compile": True}


def mixed_plant(layers: int, heads: int, kv_heads: int, windows: list[int]) -> dict:
    """``planted_llama``'s ``plant``: the query heads of every KV group but the last planted
    (all heads when there is one group), kinds cycling over :data:`PLANT_KINDS` and
    ``windows`` across heads and layers."""
    dense_from = heads - heads // kv_heads if kv_heads > 1 else heads
    plant = {}
    for layer in range(layers):
        planted = range(dense_from)
        plant[layer] = {h: (PLANT_KINDS[(i + layer) % len(PLANT_KINDS)],
                            windows[(i // len(PLANT_KINDS) + layer) % len(windows)])
                        for i, h in enumerate(planted)}
    return plant


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, reps: int, warmup: int) -> list[float]:
    """Per-call times in ms of ``reps`` calls after ``warmup`` untimed ones (CUDA events on a
    GPU, the host clock around a synchronised call elsewhere)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    return times


def time_side_by_side(variants: dict, ids: torch.Tensor, device: torch.device, reps: int) -> dict:
    """Every variant again, called in turn within each rep (the order rotating), so a drift
    in the host's or the GPU's pace (single forwards of a host-bound model vary 2x from one
    run to the next) falls on all of them alike: the speed-ups in the table come from these."""
    names = list(variants)
    times = {name: [] for name in names}
    with torch.no_grad():
        for rep in range(reps):
            for name in names[rep % len(names):] + names[:rep % len(names)]:
                times[name] += time_ms(lambda: variants[name](ids), device, 1, 0)
    return {name: {"median_ms": statistics.median(t), "times_ms": t} for name, t in times.items()}


def _allocated_gib(device: torch.device, peak: bool = False) -> float | None:
    if device.type != "cuda":
        return None
    return (torch.cuda.max_memory_allocated(device) if peak else torch.cuda.memory_allocated(device)) / 2**30


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def relative_error(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """‖candidate − reference‖ / ‖reference‖ in fp32, one sequence row block at a time
    (the logits of a 32k prefill do not fit twice more in fp32)."""
    num = den = 0.0
    for ref, out in zip(reference.flatten(0, -2).split(4096), candidate.flatten(0, -2).split(4096)):
        ref, out = ref.float(), out.float()
        num += float((out - ref).pow(2).sum())
        den += float(ref.pow(2).sum())
    return math.sqrt(num / max(den, 1e-30))


def predicted_attention_ms(plan, n: int, target: str) -> dict:
    """The cost model's attention time per forward at ``n`` (batch 1): the plan's groups
    and every head dense (:meth:`CostModel.attention_record`, what the plan summary quotes)."""
    from sparsec.analysis.cost_model import CostModel

    record = CostModel(target).attention_record(plan.attention, n)
    return {"plan_ms": record["attention_seconds"] * 1e3, "dense_ms": record["dense_attention_seconds"] * 1e3}


def fp32_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """The logits of the same weights in fp32: what the dense model's own low-precision
    error (its noise floor) and the sparse model's are measured against. A model past its
    trained length can differ from fp32 by more than any sparse plan (a chaotic model cannot
    tell right from wrong), and the table says so."""
    import copy

    with torch.no_grad():
        return copy.deepcopy(model).float()(ids)


class _Results:
    """The benchmark's record, rewritten to ``path`` after every step (partial results
    survive a later failure or a time limit)."""

    def __init__(self, path: str | None, config: dict):
        self.path = Path(path) if path else None
        self.data = {"config": config, "variants": {}, "errors": {}, "failures": {}}
        self.timed = {}                 # variant name -> its callable, for the side-by-side timing
        self.save()

    def save(self) -> None:
        if self.path is not None:
            self.path.write_text(json.dumps(self.data, indent=1, default=str))

    def step(self, name: str, fn) -> object:
        """Run one step; on failure print and record the traceback and return None."""
        start = time.perf_counter()
        try:
            return fn()
        except Exception as error:                      # one variant's failure must not lose the others
            self.data["failures"][name] = f"{type(error).__name__}: {error}"
            print(f"[{name}] FAILED after {time.perf_counter() - start:.1f} s:\n{traceback.format_exc()}", flush=True)
            return None
        finally:
            self.save()


def _time_variant(results: _Results, name: str, fn, ids, device, args, compile_s: float | None = None):
    """Time one variant at ``ids`` and record it; returns its logits (one untimed call).
    Memory: the allocator's peak during the calls, and that peak above what was allocated
    before them (weights, earlier variants' logits kept for the errors)."""
    _reset_peak(device)
    baseline = _allocated_gib(device)
    with torch.no_grad():
        start = time.perf_counter()
        logits = fn(ids)                                 # first call: compile / autotune, untimed
        _sync(device)
        first_s = time.perf_counter() - start
        times = time_ms(lambda: fn(ids), device, args.reps, args.warmup)
    peak = _allocated_gib(device, peak=True)
    row = {"median_ms": statistics.median(times), "times_ms": times, "first_call_s": first_s,
           "compile_s": compile_s, "peak_gib": peak, "peak_above_baseline_gib": peak - baseline if peak else None}
    results.data["variants"][name] = row
    results.timed[name] = fn
    print(f"[{name}] median {row['median_ms']:.2f} ms over {len(times)} (first call {first_s:.1f} s), "
          f"peak {peak} GiB", flush=True)
    return logits


class _Logits(torch.nn.Module):
    """A Hugging Face causal LM called with ids, returning its logits (what the errors compare)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids).logits


def _smollm2(device: torch.device, dtype: torch.dtype):
    """SmolLM2-135M (real, trained; stable in bf16) on CPython text: calibration windows from
    the calibration part, the timed and checked ones from the held-out part."""
    from sparsec.testing.real_models import load_smollm2, token_batches

    model, tokenizer = load_smollm2(dtype)
    model.config.use_cache = False            # the wrapper returns logits only
    model = _Logits(model.to(device)).eval()

    def inputs(length: int, seed: int) -> torch.Tensor:
        part = "calibration" if seed < 7 else "held_out"        # seeds 7 and 8 time and check
        return token_batches(tokenizer, part, length, 1, offset=seed % 7)[0].to(device)

    config = model.model.config
    return model, inputs, {"name": "SmolLM2-135M-Instruct", "layers": config.num_hidden_layers,
                           "heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads}


def _planted(args, device: torch.device, dtype: torch.dtype):
    """The Llama-shaped model with planted heads, stable at long lengths (shapes of your
    choosing; the table prints its noise floor)."""
    from sparsec.testing.planted import planted_llama, planted_llama_inputs

    plant = mixed_plant(args.layers, args.heads, args.kv_heads, args.windows)
    with torch.device(device):                      # initialise the weights where they run
        model = planted_llama(layers=args.layers, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
                              hidden=args.hidden, intermediate=args.intermediate, vocab=args.vocab, plant=plant,
                              attention="sdpa", long_context=True).to(dtype)

    def inputs(length: int, seed: int) -> torch.Tensor:
        return planted_llama_inputs(batch=1, length=length, vocab=args.vocab, seed=seed).to(device)

    return model, inputs, {"name": "planted", "planted_heads": sum(len(heads) for heads in plant.values()),
                           "heads": args.layers * args.heads}


def _generate_row(hf_model, ids: torch.Tensor, tokens: int, device: torch.device, args) -> tuple[dict, torch.Tensor]:
    """Time to first token (``generate`` of one token: the prefill) and decode tokens/s (the
    rest of a ``tokens``-token ``generate``), medians over ``--reps``; and the tokens."""
    def generate(count: int) -> torch.Tensor:
        return hf_model.generate(ids, max_new_tokens=count, min_new_tokens=count, do_sample=False, use_cache=True,
                                 pad_token_id=hf_model.config.eos_token_id)

    with torch.no_grad():
        generated = generate(tokens)                     # first call: kernels compile / autotune, untimed
        first_token_ms = statistics.median(time_ms(lambda: generate(1), device, args.reps, args.warmup))
        total_ms = statistics.median(time_ms(lambda: generate(tokens), device, args.reps, args.warmup))
    decode_s = max(total_ms - first_token_ms, 1e-9) / 1e3
    return ({"time_to_first_token_ms": first_token_ms, "generate_ms": total_ms, "new_tokens": tokens,
             "decode_tokens_per_s": (tokens - 1) / decode_s}, generated[:, ids.shape[1]:])


def bench_generate(results: "_Results", hf_model, compiled, ids: torch.Tensor, device: torch.device, args) -> None:
    """The ``generate`` variant: dense ``generate()`` against the same model with the plan attached."""
    import sparsec

    rows = results.data.setdefault("generate", {})
    rows["dense"], dense_tokens = _generate_row(hf_model, ids, args.generate, device, args)
    with sparsec.attach(hf_model, compiled):
        rows["sparsec"], sparse_tokens = _generate_row(hf_model, ids, args.generate, device, args)
    rows["sparsec"]["tokens_equal_to_dense"] = float((sparse_tokens == dense_tokens).float().mean())
    for name, row in rows.items():
        print(f"[generate {name}] time to first token {row['time_to_first_token_ms']:.1f} ms, "
              f"decode {row['decode_tokens_per_s']:.1f} tokens/s", flush=True)


def bench_e2e(args: argparse.Namespace) -> dict:
    """Run the end-to-end benchmark described by parsed ``args``; print a table, return the record."""
    import sparsec

    if args.tiny:
        for key, value in TINY.items():
            setattr(args, key, value)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    device = torch.device("cuda" if args.target != "cpu" else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"sparsec bench e2e --target {args.target} needs a CUDA GPU (or --tiny on CPU)")
    config = {k: v for k, v in vars(args).items() if k != "handler"}
    config["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    config["torch"] = torch.__version__
    results = _Results(args.json, config)

    start = time.perf_counter()
    model, inputs, record = (_smollm2(device, dtype) if args.model == "smollm2" else _planted(args, device, dtype))
    results.data["model"] = {"build_s": time.perf_counter() - start, **record,
                             "parameters": sum(p.numel() for p in model.parameters()),
                             "weights_gib": _allocated_gib(device)}
    print(f"model: {results.data['model']}", flush=True)

    example = (inputs(args.calibration_length, 0),)
    calibration = [(inputs(args.calibration_length, seed),) for seed in range(1, args.calibration_batches + 1)]

    def compile_sparse():
        start = time.perf_counter()
        # Costed at the benchmark length, verified there or at --verify-n.
        compiled = sparsec.compile(model, example, calibration=calibration, target=args.target, recall=args.recall,
                                   seq_len=args.n, verification=[(inputs(args.verify_n or args.n, 3),)])
        _sync(device)
        seconds = time.perf_counter() - start
        kinds = Counter(h.pattern for site in compiled.plan.attention for h in site.heads)
        groups = Counter((g.pattern, json.dumps(g.params, sort_keys=True)) for site in compiled.plan.attention
                         for g in site.groups)
        results.data["plan"] = {
            "compile_s": seconds, "sparse_heads": sum(not h.is_dense for site in compiled.plan.attention for h in site.heads),
            "heads": sum(kinds.values()), "kinds": dict(kinds),
            "distinct_groups": [[kind, params, count] for (kind, params), count in groups.most_common()],
            "error_at_calibration_length": compiled.plan.error.get("rel_l2_vs_dense_on_example"),
            "predicted_attention_ms": predicted_attention_ms(compiled.plan, args.n, args.target)}
        print(f"sparsec compile: {seconds:.1f} s, sparse heads {results.data['plan']['sparse_heads']}/"
              f"{results.data['plan']['heads']} {dict(kinds)}", flush=True)
        if args.verbose:
            print(compiled.plan.summary())
        return compiled

    compiled = results.step("sparsec compile", compile_sparse)
    ids = inputs(args.n, 7)

    # Eager dense first: its logits are every error's reference.
    reference = results.step("eager", lambda: _time_variant(results, "eager", model, ids, device, args))
    if compiled is not None:
        sparse_logits = results.step("sparsec", lambda: _time_variant(
            results, "sparsec", compiled, ids, device, args, results.data["plan"]["compile_s"]))
        if reference is not None and sparse_logits is not None:
            results.data["errors"][f"sparsec_vs_eager_at_{args.n}"] = relative_error(reference, sparse_logits)
        if reference is not None and next(model.parameters()).dtype != torch.float32:
            def stability():
                exact = fp32_logits(model, ids)
                errors = results.data["errors"]
                errors[f"dense_{args.dtype}_vs_fp32_at_{args.n}"] = relative_error(exact, reference)
                if sparse_logits is not None:
                    errors[f"sparsec_{args.dtype}_vs_fp32_at_{args.n}"] = relative_error(exact, sparse_logits)
            results.step("dense stability", stability)
        if args.check_n:
            def check():
                with torch.no_grad():
                    short = inputs(args.check_n, 8)
                    error = relative_error(model(short), compiled(short))
                results.data["errors"][f"sparsec_vs_eager_at_{args.check_n}"] = error
            results.step("sparsec check", check)
        del sparse_logits
        results.save()
    if args.generate and compiled is not None:
        if args.model == "smollm2":
            results.step("generate", lambda: bench_generate(results, model.model, compiled, ids, device, args))
        else:
            print("[generate] skipped: the planted model has no generate()", flush=True)
    if not args.no_torch_compile:
        def torch_compiled(name: str, module, target=None):
            compiled_module = torch.compile(module, dynamic=False)

            def fast(ids):
                with running_for(target) if target else contextlib.nullcontext():
                    return compiled_module(ids)

            start = time.perf_counter()
            with torch.no_grad():
                fast(ids)
            _sync(device)
            logits = _time_variant(results, name, fast, ids, device, args, time.perf_counter() - start)
            if reference is not None:
                results.data["errors"][f"{name}_vs_eager_at_{args.n}"] = relative_error(reference, logits)
        results.step("torch.compile", lambda: torch_compiled("torch.compile", model))
        if compiled is not None:
            # sparsec's graph through Inductor: sparse attention stays one custom op, the rest fuses;
            # the op runs with the compiled target's kernel configs, as CompiledModel.__call__ does.
            results.step("sparsec+compile",
                         lambda: torch_compiled("sparsec+compile", compiled.graph_module, compiled.plan.target))
    if len(results.timed) > 1:
        results.step("side by side", lambda: results.data.update(
            side_by_side=time_side_by_side(results.timed, ids, device, args.reps)))
    print(format_table(results.data))
    return results.data


def format_table(data: dict) -> str:
    """The result table: per variant median, peak memory and speed-up over eager dense."""
    config, variants = data["config"], data["variants"]
    model = data.get("model", {})
    shape = (f"layers {config['layers']}, heads {config['heads']}:{config['kv_heads']}, D={config['head_dim']}, "
             f"hidden {config['hidden']}, intermediate {config['intermediate']}, vocab {config['vocab']}"
             if config.get("model", "planted") == "planted" else
             f"{model.get('name')}: {model.get('layers')} layers, heads {model.get('heads')}:{model.get('kv_heads')}")
    lines = [f"device {config['device']}, torch {config['torch']}, {config['dtype']}, batch 1, N={config['n']}, "
             + shape]
    if model.get("weights_gib") is not None:
        lines.append(f"weights {model['weights_gib']:.2f} GiB ({model['parameters'] / 1e9:.2f} B parameters)")
    plan = data.get("plan")
    if plan:
        lines.append(f"plan: {plan['sparse_heads']}/{plan['heads']} sparse heads {plan['kinds']}, compiled in "
                     f"{plan['compile_s']:.1f} s at N={config['calibration_length']}; predicted attention per "
                     f"forward at N={config['n']}: plan {plan['predicted_attention_ms']['plan_ms']:.1f} ms, dense "
                     f"{plan['predicted_attention_ms']['dense_ms']:.1f} ms")
    side = data.get("side_by_side", {})
    eager = side.get("eager", {}).get("median_ms")
    header = (f"{'variant':<16} {'side by side ms':>15} {'vs eager':>8} {'alone ms':>9} {'peak GiB':>9} "
              f"{'above base':>10} {'compile s':>9} {'first call s':>12}")
    lines += [header, "-" * len(header)]
    for name, row in variants.items():
        together = side.get(name, {}).get("median_ms", math.nan)
        peak, above, compile_s = (math.nan if row[key] is None else row[key]
                                  for key in ("peak_gib", "peak_above_baseline_gib", "compile_s"))
        lines.append(f"{name:<16} {together:>15.2f} {(eager or math.nan) / together:>8.2f} {row['median_ms']:>9.2f} "
                     f"{peak:>9.2f} {above:>10.2f} {compile_s:>9.1f} {row['first_call_s']:>12.1f}")
    for name, row in data.get("generate", {}).items():
        agreement = row.get("tokens_equal_to_dense")
        lines.append(f"generate {name:<8} time to first token {row['time_to_first_token_ms']:>9.1f} ms, decode "
                     f"{row['decode_tokens_per_s']:>8.1f} tokens/s over {row['new_tokens']} tokens"
                     + ("" if agreement is None else f", tokens equal to dense {agreement:.0%}"))
    for name, value in data["errors"].items():
        lines.append(f"rel. L2 error of logits, {name}: {value:.3e}")
    floor = next((value for name, value in data["errors"].items() if name.startswith("dense_")), None)
    if floor is not None and floor > STABLE_DENSE_ERROR:
        lines.append(f"WARNING: dense {config['dtype']} differs from dense fp32 by {floor:.3g} (> {STABLE_DENSE_ERROR}): "
                     "this model is numerically unstable at this length, so its sparse errors mean nothing")
    for name, message in data["failures"].items():
        lines.append(f"FAILED {name}: {message[:300]}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=["smollm2", "planted"], default="smollm2",
                        help="smollm2: real, stable in bf16 up to its 8k training length; planted: a Llama "
                             "shape of the sizes below with planted heads, stable in bf16 up to 128k")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336, help="SwiGLU width (Llama-3-8B's)")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--windows", type=int, nargs="+", default=[512, 1024], help="planted window sizes")
    parser.add_argument("--n", type=int, default=32768, help="prefill length")
    parser.add_argument("--check-n", type=int, default=4096,
                        help="also measure the logit error at this second length (0: skip)")
    parser.add_argument("--calibration-length", type=int, default=2048)
    parser.add_argument("--verify-n", type=int, default=0,
                        help="compile's verification length (0: --n); shorter verifies faster, and the "
                             "table still measures the error at --n")
    parser.add_argument("--calibration-batches", type=int, default=1)
    parser.add_argument("--recall", type=float, default=0.95)
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    parser.add_argument("--target", default="h100", help="sparsec target; cpu runs on the CPU")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--no-torch-compile", action="store_true")
    parser.add_argument("--generate", type=int, default=32, metavar="TOKENS",
                        help="also time generate() of this many tokens after the prompt, dense vs sparsec.attach "
                             "(time to first token, decode tokens/s; smollm2 only; 0 skips)")
    parser.add_argument("--tiny", action="store_true",
                        help="2 layers, 4 heads, N=1024, fp32 on the CPU: checks the script, times nothing useful")
    parser.add_argument("--verbose", action="store_true", help="print the plan summary")
    parser.add_argument("--json", help="write the record here (rewritten after every step)")


def run(args: argparse.Namespace) -> int:
    bench_e2e(args)
    return 0
