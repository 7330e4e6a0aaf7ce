"""Passkey retrieval with ``model.generate()``: SmolLM2 prefills a long prompt sparsely.

A 5-digit pass key is hidden in filler text (Mohtashami & Jaggi 2023's passkey task); the
model is compiled once on CPython source text, the plan is attached to the Hugging Face
model (``sparsec.attach``), and ``generate()`` answers with its own KV cache: prefill runs
the plan, decode runs dense. The dense model answers the same prompt; both answers and both
prefill times (time to first token) are printed.

    python examples/generate_passkey.py                         # CPU, ~1.5k tokens, a few minutes
    python examples/generate_passkey.py --device cuda --length 8192 --target h100 --dtype bf16
"""
import argparse
import time

import torch

import sparsec
from sparsec.tools.bench_quality import passkey_prompt
from sparsec.testing.real_models import load_smollm2, token_batches


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def prefill_seconds(model, ids: torch.Tensor) -> float:
    """Time to first token: one generate() step (the prefill and its arg-max)."""
    _sync(ids.device)
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=1, do_sample=False, use_cache=True)
    _sync(ids.device)
    return time.perf_counter() - start


@torch.no_grad()
def answer(model, tokenizer, ids: torch.Tensor, tokens: int) -> str:
    out = model.generate(ids, max_new_tokens=tokens, do_sample=False, use_cache=True)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=1536, help="prompt tokens")
    parser.add_argument("--depth", type=float, default=0.5, help="where the key sits, as a fraction of the filler")
    parser.add_argument("--key", default="71432")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--target", default="cpu", help="sparsec target (h100, h200 on a GPU)")
    parser.add_argument("--calibration-length", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=8, help="tokens to generate")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]

    model, tokenizer = load_smollm2(dtype)
    model = model.to(device)
    calibration = [(ids.to(device),) for ids in token_batches(tokenizer, "calibration", args.calibration_length, 2)]
    start = time.perf_counter()
    # Costed at the prompt length: the patterns are chosen for what generate() will prefill.
    compiled = sparsec.compile(model, calibration[0], calibration=calibration, target=args.target,
                               seq_len=args.length)
    sparse = sum(head.pattern != "dense" for site in compiled.plan.attention for head in site.heads)
    total = sum(len(site.heads) for site in compiled.plan.attention)
    print(f"compiled in {time.perf_counter() - start:.1f} s: {sparse}/{total} heads sparse")

    ids = passkey_prompt(tokenizer, args.length, args.depth, args.key).to(device)
    print(f"prompt: {ids.shape[1]} tokens, pass key {args.key} at depth {args.depth:.0%}")
    dense_answer = answer(model, tokenizer, ids, args.tokens)
    dense_seconds = prefill_seconds(model, ids)
    with sparsec.attach(model, compiled):
        sparse_answer = answer(model, tokenizer, ids, args.tokens)
        sparse_seconds = prefill_seconds(model, ids)
    print(f"dense   answer: {dense_answer!r} (prefill {dense_seconds * 1e3:.0f} ms)")
    print(f"sparsec answer: {sparse_answer!r} (prefill {sparse_seconds * 1e3:.0f} ms)")
    print(f"pass key retrieved: dense {args.key in dense_answer.replace(' ', '')}, "
          f"sparsec {args.key in sparse_answer.replace(' ', '')}")


if __name__ == "__main__":
    main()
