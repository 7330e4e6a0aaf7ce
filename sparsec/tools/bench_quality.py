"""``sparsec bench quality``: what sparsec's plan does to a real trained model's output.

The model is SmolLM2-135M-Instruct (``--model smollm2``, a Llama with 30 layers, 9 query
and 3 KV heads, 8k positions) or all-MiniLM-L6-v2 (``--model minilm``, a BERT encoder, 512
positions), loaded offline from installed packages (:mod:`sparsec.testing.real_models`).
The text is CPython's standard library, split by file into a calibration part and a
held-out part.

sparsec compiles the model once, calibrating on ``--calibration-batches`` windows of
``--calibration-length`` tokens of the calibration part; the plan's pattern sizes are
elastic (``a + b·N``), so the one plan serves every measured length. Then, per length in
``--lengths``, on ``--batches`` consecutive held-out windows:

- perplexity of the dense and the compiled model (next-token cross-entropy, exponentiated),
- top-1 agreement: the fraction of positions whose arg-max next token is the same,
- mean KL(dense ‖ compiled) of the next-token distributions, in nats per position,
- the plan's attention-FLOP cut at that length (each head's ``cost_expr`` through
  :func:`sparsec.analysis.cost_model.head_flops`, summed over heads, against every head dense),
- passkey retrieval (Mohtashami & Jaggi 2023, "Landmark Attention"): a 5-digit key hidden
  at 10%, 50% and 90% depth of repeated neutral filler built to the length; both models
  greedily decode ``--passkey-tokens`` tokens by repeated full forwards (the compiled
  model keeps no KV cache) and the key is retrieved if its digits appear in the answer.

For MiniLM (an encoder: no next tokens) each length reports the cosine similarity of the
mean-pooled sentence embeddings and the relative L2 error of the last hidden state.

Whatever the compiler's verification recorded in ``plan.error`` is printed as it is.
Runs on the CPU (short lengths, fp32) or on a GPU (``--device cuda``, ``--dtype bf16``).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
import traceback
from collections import Counter
from pathlib import Path

import torch

from sparsec.patterns.base import kept_pairs_log

PASSKEY_DEPTHS = (0.1, 0.5, 0.9)
# The passkey task's wording from Mohtashami & Jaggi (2023), used by later long-context
# evaluations (LongLoRA, InfLLM, MInference).
_PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                  "I will quiz you about the important info there.\n\n")
_PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
_PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
_PASSKEY_QUESTION = "\n\nWhat is the pass key? The pass key is"
_ROW_CHUNK = 1024                  # logit rows per step of the metrics (a 8k x 49k fp32 block is 1.6 GB)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# -- models -------------------------------------------------------------------------------

def _output_tensor(output) -> torch.Tensor:
    """The first tensor of a model output: ``logits`` of a causal LM, ``last_hidden_state`` of
    an encoder (a ``ModelOutput`` or a tuple; compiled models return the same structure)."""
    if isinstance(output, torch.Tensor):
        return output
    for name in ("logits", "last_hidden_state"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    return output[0]


def load_model(name: str, dtype: torch.dtype):
    """``(model, tokenizer, description)`` of ``smollm2`` or ``minilm`` (on the CPU)."""
    from sparsec.testing import real_models

    if name == "smollm2":
        model, tokenizer = real_models.load_smollm2(dtype)
        label = "SmolLM2-135M-Instruct"
    elif name == "minilm":
        model, tokenizer = real_models.load_minilm(dtype)
        label = "all-MiniLM-L6-v2"
    else:
        raise ValueError(f"unknown model {name!r}; choose smollm2 or minilm")
    config = model.config
    description = {"name": label, "layers": config.num_hidden_layers, "heads": config.num_attention_heads,
                   "kv_heads": getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
                   "head_dim": getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
                   "max_positions": config.max_position_embeddings,
                   "parameters": sum(p.numel() for p in model.parameters())}
    return model, tokenizer, description


def text_windows(tokenizer, part: str, length: int, count: int, encoder: bool, offset: int = 0) -> list[torch.Tensor]:
    """``count`` ``[1, length]`` id windows of the CPython text's ``part`` from window
    ``offset``; an encoder's get its ``[CLS] ... [SEP]`` around ``length - 2`` text tokens,
    as it saw in training."""
    from sparsec.testing.real_models import token_batches

    if not encoder:
        return token_batches(tokenizer, part, length, count, offset)
    cls, sep = torch.tensor([[tokenizer.cls_token_id]]), torch.tensor([[tokenizer.sep_token_id]])
    return [torch.cat([cls, ids, sep], dim=1) for ids in token_batches(tokenizer, part, length - 2, count, offset)]


# -- metrics ------------------------------------------------------------------------------

def next_token_metrics(dense_logits: torch.Tensor, sparse_logits: torch.Tensor, ids: torch.Tensor) -> dict:
    """Sums over the ``n - 1`` predicted positions of one ``[1, n]`` window: next-token
    negative log-likelihood of each model, positions whose arg-max agrees, KL(dense ‖ sparse)
    in nats; and ``positions``. Computed in fp32, ``_ROW_CHUNK`` rows at a time."""
    dense_logits, sparse_logits = dense_logits[0, :-1], sparse_logits[0, :-1]
    targets = ids[0, 1:].to(dense_logits.device)
    totals = {"nll_dense": 0.0, "nll_compiled": 0.0, "top1_agree": 0, "kl": 0.0}
    for start in range(0, targets.numel(), _ROW_CHUNK):
        rows = slice(start, start + _ROW_CHUNK)
        dense = torch.log_softmax(dense_logits[rows].float(), dim=-1)
        sparse = torch.log_softmax(sparse_logits[rows].float(), dim=-1)
        target = targets[rows].unsqueeze(-1)
        totals["nll_dense"] -= float(dense.gather(-1, target).sum())
        totals["nll_compiled"] -= float(sparse.gather(-1, target).sum())
        totals["top1_agree"] += int((dense.argmax(-1) == sparse.argmax(-1)).sum())
        totals["kl"] += float((dense.exp() * (dense - sparse)).sum())
    totals["positions"] = targets.numel()
    return totals


def attention_flops(plan, n: int, kept: dict | None = None) -> dict:
    """Attention FLOPs of one forward at ``n_q = n_k = n`` (batch 1) summed over every
    head of the plan, and the same heads dense, from the patterns' ``cost_expr``; a dynamic
    family in ``kept`` (``{kind: [kept pairs, all pairs]}`` its estimates logged on the
    inputs, :func:`~sparsec.patterns.base.kept_pairs_log`) at the share of pairs it kept."""
    from sparsec.analysis.cost_model import head_flops
    from sparsec.patterns import get_pattern
    from sparsec.patterns.base import full_pairs

    kept = kept or {}
    planned = dense = 0.0
    for site in plan.attention:
        causal = site.effective_causal()
        for group in site.groups or site.instance_groups():
            if group.pattern in kept:
                share = kept[group.pattern][0] / max(kept[group.pattern][1], 1)
                flops = get_pattern(group.pattern).cost_of_pairs(share * full_pairs(n, causal), group.params, n,
                                                                 causal, site.head_dim)
            else:
                flops = head_flops(group.pattern, group.params, n, causal, site.head_dim)
            planned += len(group.heads) * flops
        dense += site.num_heads * head_flops("dense", {}, n, causal, site.head_dim)
    return {"plan": planned, "dense": dense, "cut": 1.0 - planned / dense if dense else 0.0}


# -- passkey retrieval --------------------------------------------------------------------

def passkey_prompt(tokenizer, length: int, depth: float, key: str) -> torch.Tensor:
    """``[1, <= length]`` ids: the intro, filler sentences with the key's needle after
    ``depth`` of them, more filler, and the question, filling ``length`` tokens."""
    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    fixed = len(encode(_PASSKEY_INTRO)) + len(encode(_PASSKEY_NEEDLE.format(key=key))) + len(encode(_PASSKEY_QUESTION))
    per_filler = len(encode(_PASSKEY_FILLER * 8)) / 8
    fillers = max(int((length - fixed) / per_filler), 2)
    before = round(depth * fillers)
    while True:                     # joint tokenisation can differ by a few tokens: trim to fit
        text = (_PASSKEY_INTRO + _PASSKEY_FILLER * before + _PASSKEY_NEEDLE.format(key=key)
                + _PASSKEY_FILLER * (fillers - before) + _PASSKEY_QUESTION)
        ids = encode(text)
        if len(ids) <= length or fillers <= 2:
            return torch.tensor([ids], dtype=torch.long)
        fillers -= 1
        before = round(depth * fillers)


@torch.no_grad()
def greedy_decode(model, ids: torch.Tensor, tokens: int) -> torch.Tensor:
    """``tokens`` arg-max tokens after ``ids``, each by a full forward of the whole sequence
    (no KV cache: a compiled model has none)."""
    generated = []
    for _ in range(tokens):
        next_id = _output_tensor(model(ids))[:, -1].argmax(-1, keepdim=True).to(ids.dtype)
        generated.append(next_id)
        ids = torch.cat([ids, next_id], dim=1)
    return torch.cat(generated, dim=1)


def passkey_retrieval(dense, compiled, tokenizer, length: int, tokens: int, device, seed: int = 0) -> dict:
    """Per depth: the key, and for the dense and the compiled model the decoded answer and
    whether the key's digits are in it. Prompts leave room for the decoded tokens."""
    results = {}
    for i, depth in enumerate(PASSKEY_DEPTHS):
        key = str(random.Random(seed * 1000 + length * 10 + i).randint(10000, 99999))
        ids = passkey_prompt(tokenizer, length - tokens, depth, key).to(device)
        row = {"key": key, "prompt_tokens": ids.shape[1]}
        for name, model in (("dense", dense), ("compiled", compiled)):
            answer_ids = greedy_decode(model, ids, tokens)[0].tolist()
            answer = tokenizer.decode(answer_ids, clean_up_tokenization_spaces=False)
            row[name] = {"answer": answer, "retrieved": key in answer.replace(" ", "")}
        results[f"{depth:.0%}"] = row
    return results


# -- the benchmark ------------------------------------------------------------------------

def parse_lengths(text) -> list[int]:
    return [int(n) for n in str(text).split(",") if n.strip()]


def compile_model(model, tokenizer, args, device, encoder: bool):
    """``(compiled, record)``: sparsec.compile on calibration windows, timed."""
    import sparsec

    windows = [ids.to(device) for ids in text_windows(tokenizer, "calibration", args.calibration_length,
                                                      args.calibration_batches, encoder)]
    # Verified at the longest measured length (the serving length), on calibration-part
    # text after the calibration windows: never the held-out text the table reports.
    serving = args.verify_length if args.verify_length is not None else max(parse_lengths(args.lengths))
    verification = None
    if serving > args.calibration_length:
        offset = math.ceil(args.calibration_length * args.calibration_batches / serving)   # in windows
        verification = [(ids.to(device),) for ids in text_windows(tokenizer, "calibration", serving,
                                                                   args.verify_batches, encoder, offset)]
    start, start_cpu = time.perf_counter(), time.process_time()
    compiled = sparsec.compile(model, (windows[0],), calibration=[(ids,) for ids in windows],
                               target=args.target, recall=args.recall, patterns=args.patterns,
                               seq_len=max(serving, args.calibration_length),
                               verification=verification)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    # CPU seconds of this process too: on a shared machine the wall clock measures the others.
    cpu_seconds = time.process_time() - start_cpu
    kinds = Counter(head.pattern for site in compiled.plan.attention for head in site.heads)
    record = {"compile_s": seconds, "compile_cpu_s": cpu_seconds,
              "calibration_tokens": args.calibration_length * args.calibration_batches,
              "sparse_heads": sum(not head.is_dense for site in compiled.plan.attention for head in site.heads),
              "heads": sum(kinds.values()), "kinds": dict(kinds), "plan_error": dict(compiled.plan.error),
              # what verification measured on calibration-part text (the table is held-out text)
              "verification": verification_summary(compiled.plan.verification)}
    return compiled, record


def verification_summary(record) -> dict | None:
    """The verification record without its per-step list: how many steps made heads denser,
    and how many of them were refits."""
    if record is None:
        return None
    summary = record.to_dict()
    summary["steps"], summary["refits"] = len(summary.pop("densified", [])), len(record.refitted)
    return summary


@torch.no_grad()
def evaluate_length(model, compiled, tokenizer, length: int, batches: int, device, encoder: bool = False,
                    passkey_tokens: int = 6) -> dict:
    """Every metric of one length on ``batches`` held-out windows (see the module docstring)."""
    row = {"length": length, "batches": batches, "attention_flops": attention_flops(compiled.plan, length)}
    windows = text_windows(tokenizer, "held_out", length, batches, encoder)
    if encoder:
        from sparsec.ir.inputs import relative_l2
        from sparsec.testing.real_models import mean_pooled

        cosines, errors = [], []
        for ids in windows:
            ids = ids.to(device)
            dense, sparse = _output_tensor(model(ids)).float(), _output_tensor(compiled(ids)).float()
            cosines.append(float((mean_pooled(dense) * mean_pooled(sparse)).sum()))
            errors.append(relative_l2(dense, sparse))
        row.update(embedding_cosine=min(cosines), hidden_rel_l2=max(errors))
        return row
    totals = Counter()
    with kept_pairs_log() as kept:
        for ids in windows:
            ids = ids.to(device)
            totals.update(next_token_metrics(_output_tensor(model(ids)), _output_tensor(compiled(ids)), ids))
    if kept:
        # The plan's pair count of a dynamic family is its calibration figure; this is what
        # its estimates kept on these windows.
        row["attention_flops"] = {**attention_flops(compiled.plan, length, kept),
                                  "planned_cut": row["attention_flops"]["cut"],
                                  "kept": {kind: pairs[0] / max(pairs[1], 1) for kind, pairs in kept.items()}}
    positions = totals["positions"]
    row.update(ppl_dense=math.exp(totals["nll_dense"] / positions),
               ppl_compiled=math.exp(totals["nll_compiled"] / positions),
               top1_agreement=totals["top1_agree"] / positions, kl_nats=totals["kl"] / positions)
    if passkey_tokens:
        row["passkey"] = passkey_retrieval(model, compiled, tokenizer, length, passkey_tokens, device)
    return row


def bench_quality(args: argparse.Namespace) -> dict:
    """Run the benchmark described by parsed ``args``; print a table, return the record."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("sparsec bench quality --device cuda needs a CUDA GPU")
    lengths = parse_lengths(args.lengths)
    config = {k: v for k, v in vars(args).items() if k != "handler"}
    config.update(lengths=lengths, torch=torch.__version__,
                  device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
    data = {"config": config, "lengths": [], "failures": {}}
    path = Path(args.json) if args.json else None

    def save() -> None:
        if path is not None:
            path.write_text(json.dumps(data, indent=1, default=str))

    start = time.perf_counter()
    model, tokenizer, description = load_model(args.model, DTYPES[args.dtype])
    model = model.to(device)
    description["load_s"] = time.perf_counter() - start
    data["model"] = description
    encoder = args.model == "minilm"
    too_long = [n for n in lengths + [args.calibration_length] if n > description["max_positions"]]
    if too_long:
        raise SystemExit(f"{description['name']} has {description['max_positions']} positions; lengths "
                         f"{too_long} do not fit: pass shorter --lengths / --calibration-length")
    print(f"model {description['name']}: {description}", flush=True)
    compiled, data["compile"] = compile_model(model, tokenizer, args, device, encoder)
    save()
    print(f"compile: {data['compile']['compile_s']:.1f} s, sparse heads {data['compile']['sparse_heads']}/"
          f"{data['compile']['heads']} {data['compile']['kinds']}", flush=True)
    if args.verbose:
        print(compiled.plan.summary())
    for length in lengths:
        step = time.perf_counter()
        try:
            row = evaluate_length(model, compiled, tokenizer, length, args.batches, device, encoder,
                                  0 if args.no_passkey else args.passkey_tokens)
        except Exception as error:                 # one length's failure (e.g. memory) must not lose the others
            data["failures"][str(length)] = f"{type(error).__name__}: {error}"
            print(f"[length {length}] FAILED:\n{traceback.format_exc()}", flush=True)
            continue
        finally:
            save()
        row["seconds"] = time.perf_counter() - step
        data["lengths"].append(row)
        save()
        print(f"[length {length}] done in {row['seconds']:.1f} s", flush=True)
    print(format_table(data))
    return data


def format_plan_error(error: dict, prefix: str = "") -> str:
    """``plan.error`` as ``key=value`` pairs whatever its keys: nested dicts flattened with
    dotted keys, floats to 3 digits, lists longer than 4 shown by their length."""
    parts = []
    for key, value in error.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            parts.append(format_plan_error(value, name + ".") or f"{name}={{}}")
        elif isinstance(value, float):
            parts.append(f"{name}={value:.3g}")
        elif isinstance(value, (list, tuple)) and len(value) > 4:
            parts.append(f"{name}=[{len(value)} items]")
        else:
            parts.append(f"{name}={value}")
    return ", ".join(parts)


def _passkey_cell(passkey: dict | None, name: str) -> str:
    if not passkey:
        return "-"
    return " ".join("Y" if row[name]["retrieved"] else "n" for row in passkey.values())


def format_table(data: dict) -> str:
    """The result table: one row per length."""
    config, model, compile_record = data["config"], data.get("model", {}), data.get("compile", {})
    lines = [f"{model.get('name')}: {model.get('layers')} layers, {model.get('heads')}:{model.get('kv_heads')} heads, "
             f"D={model.get('head_dim')}; device {config['device_name']}, {config['dtype']}, torch {config['torch']}, "
             f"target {config['target']}, recall {config['recall']}"]
    if compile_record:
        cpu_s = compile_record.get("compile_cpu_s", math.nan)
        lines.append(f"compile: {compile_record['compile_s']:.1f} s ({cpu_s:.1f} CPU s) on "
                     f"{config['calibration_batches']} x {config['calibration_length']} calibration tokens; "
                     f"sparse heads {compile_record['sparse_heads']}/{compile_record['heads']} {compile_record['kinds']}")
        lines.append("plan.error: " + (format_plan_error(compile_record["plan_error"]) or "(empty)"))
        verified = compile_record.get("verification")
        if verified:
            top1 = verified.get("top1_agreement")
            lines.append(f"verified on calibration-part text at {verified['lengths']}: {verified['metric']} "
                         f"{verified['measured']:.3g}" + ("" if top1 is None else f", top-1 {top1:.4f}")
                         + f"; {verified['rounds']} round(s), {verified['steps']} step(s) made heads denser "
                         f"({verified['refits']} refits)")
    encoder = config["model"] == "minilm"
    if encoder:
        header = f"{'length':>7} {'batches':>7} {'emb. cosine':>11} {'hidden rel L2':>13} {'attn FLOP cut':>13}"
    else:
        header = (f"{'length':>7} {'batches':>7} {'ppl dense':>9} {'ppl sparsec':>11} {'top-1 agree':>11} "
                  f"{'KL nats':>9} {'attn FLOP cut':>13} {'passkey dense':>13} {'passkey sparsec':>15}")
    lines += [header, "-" * len(header)]
    for row in data["lengths"]:
        cut = f"{row['attention_flops']['cut']:.1%}"
        if encoder:
            lines.append(f"{row['length']:>7} {row['batches']:>7} {row['embedding_cosine']:>11.5f} "
                         f"{row['hidden_rel_l2']:>13.3e} {cut:>13}")
        else:
            lines.append(f"{row['length']:>7} {row['batches']:>7} {row['ppl_dense']:>9.3f} "
                         f"{row['ppl_compiled']:>11.3f} {row['top1_agreement']:>11.4f} {row['kl_nats']:>9.2e} {cut:>13} "
                         f"{_passkey_cell(row.get('passkey'), 'dense'):>13} "
                         f"{_passkey_cell(row.get('passkey'), 'compiled'):>15}")
    for row in data["lengths"]:
        flops = row["attention_flops"]
        if "kept" in flops:
            kept = ", ".join(f"{kind} {share:.1%}" for kind, share in flops["kept"].items())
            lines.append(f"at {row['length']}: dynamic estimates kept {kept} of their heads' pairs; the cut counts "
                         f"that (the plan's calibration figures: {flops['planned_cut']:.1%})")
    if not encoder and any(row.get("passkey") for row in data["lengths"]):
        lines.append("passkey: retrieved (Y) or not (n) at depths " + ", ".join(f"{d:.0%}" for d in PASSKEY_DEPTHS))
    for name, message in data["failures"].items():
        lines.append(f"FAILED at length {name}: {message[:300]}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=["smollm2", "minilm"], default="smollm2")
    parser.add_argument("--lengths", default="2048,4096,8192",
                        help="comma-separated held-out lengths (CPU: short ones, e.g. 256,512; minilm: <= 512)")
    parser.add_argument("--batches", type=int, default=2, help="held-out windows per length")
    parser.add_argument("--calibration-length", type=int, default=2048)
    parser.add_argument("--calibration-batches", type=int, default=2)
    parser.add_argument("--target", default="h100", help="sparsec target (cost model the plan is made for)")
    parser.add_argument("--recall", type=float, default=0.95)
    parser.add_argument("--patterns", type=lambda text: text.split(","),
                        help="comma-separated families heads may take (compile's patterns=; default all)")
    parser.add_argument("--verify-length", type=int,
                        help="length compile verifies (and costs) the plan at; default the longest of --lengths "
                             "(0: the calibration length only)")
    parser.add_argument("--verify-batches", type=int, default=2,
                        help="calibration-part windows compile verifies the plan on at that length: rounds run on "
                             "the first, the plan must hold on all (one window let the rounds fit its text: "
                             "SmolLM2 at 8k verified top-1 0.982, held-out 0.976)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--passkey-tokens", type=int, default=6, help="tokens decoded for the passkey answer")
    parser.add_argument("--no-passkey", action="store_true", help="skip passkey retrieval")
    parser.add_argument("--verbose", action="store_true", help="print the plan summary")
    parser.add_argument("--json", help="write the record here (rewritten after every length)")


def run(args: argparse.Namespace) -> int:
    bench_quality(args)
    return 0
