"""Compile a small Llama-style model with planted sparse heads and run it.

The model (4 layers, 8 query heads over 2 KV heads, RoPE, random weights) has a few
heads planted to attend in a sliding window, to a sink token plus a window, or to
separator tokens (vertical stripes). sparsec should find those, keep the rest dense,
and reproduce the dense model's output closely at the calibration length and at another.

    python examples/compile_llama.py                 # SPARSEC_DUMP=dump/ to see every pass
"""
import time

import torch

import sparsec
from sparsec.ir.inputs import relative_l2
from sparsec.testing.planted import planted_llama, planted_llama_inputs

# On the cpu target a site's sparse heads must save the profile's margin of its time (13 %,
# docs/benchmarks.md "cpu"): at 2048 tokens this model's two planted heads per site save ~8 %
# and every site stays dense; at 4096 they pay.
LENGTH = 4096


def main() -> None:
    model = planted_llama()
    example = (planted_llama_inputs(batch=2, length=LENGTH, seed=0),)
    calibration = [(planted_llama_inputs(batch=2, length=LENGTH, seed=seed),) for seed in (1, 2)]

    start = time.perf_counter()
    cm = sparsec.compile(model, example, calibration=calibration, target="cpu", recall=0.95)
    print(f"compiled in {time.perf_counter() - start:.1f} s\n")
    print(cm.plan.summary())

    sparse_heads = sum(h.pattern != "dense" for site in cm.plan.attention for h in site.heads)
    total_heads = sum(len(site.heads) for site in cm.plan.attention)
    print(f"\nsparse heads: {sparse_heads} / {total_heads}")

    with torch.no_grad():
        for length in (LENGTH, 6000):            # a plan serves any length
            ids = planted_llama_inputs(batch=2, length=length, seed=7)
            error = relative_l2(model(ids), cm(ids))
            print(f"N={length}: relative L2 error of the logits vs the dense model = {error:.2e}")


if __name__ == "__main__":
    main()
