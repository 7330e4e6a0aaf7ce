#!/usr/bin/env python3
"""Shared memory, registers and spills of generated attention kernels, compiled for a GPU
arch on a machine without one (Triton's bundled ptxas; the local Triton's numbers).

    python3 scripts/kernel_resources.py --pattern block_topk --configs m128n128w8s3 m128n64w8s3
"""
from __future__ import annotations

import argparse
import inspect
import json
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from sparsec.bench import bench_groups
from sparsec.codegen.triton.configs import KernelConfig
from sparsec.codegen.triton.generator import KernelSpec
from sparsec.runtime.kernels import load_kernel

_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"

_CASES = {"window": "window-512", "sink_window": "sink_window", "multi_diagonal": "multi_diagonal",
          "vertical_stripe": "vertical_stripe", "block_topk": "block_topk", "vertical_slash": "vertical_slash"}
_INTS = {"num_group_heads", "per_kv", "n_q", "n_k", "sink", "window", "period", "width", "count", "bias",
         "n_columns", "block", "grid_q", "grid_k", "blocks_q", "blocks_k"}


def compile_for(spec: KernelSpec, capability: int, mask_kind: int = 0):
    module = load_kernel(spec)
    fn = module._sparse_attention_fwd
    config = spec.config
    constexprs = {**module.CONSTEXPRS, "MASK_KIND": mask_kind}
    if spec.template == "lut":          # as the runtime decides it at n_q = n_k
        block = json.loads(spec.params).get("block", 0)
        constexprs["UNIFORM_TILES"] = bool(block) and block % config.block_m == 0 and block % config.block_n == 0
    signature = {}
    for name in inspect.signature(fn.fn).parameters:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in ("K_desc", "V_desc"):
            signature[name] = (f"tensordesc<bf16[{config.block_n}, {spec.head_dim}]>" if config.tma else "*bf16")
        elif name == "qk_scale":
            signature[name] = "fp32"
        elif name.startswith("stride_") or name in _INTS:
            signature[name] = "i32"
        elif name in ("Q", "K", "V", "Out"):
            signature[name] = "*bf16"
        else:
            signature[name] = "*i32"
    source = ASTSource(fn, signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": config.num_warps, "num_stages": config.num_stages})


def resource_usage(kernel) -> str:
    """ptxas's registers, spills and stack of the compiled cubin (cuobjdump's resource report)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        report = subprocess.run([str(_BIN / "cuobjdump"), "--dump-resource-usage", f.name],
                                capture_output=True, text=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", report)
    return f"regs {match[1]}, stack {match[2]}, local {match[4]}" if match else report.strip()[-200:]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pattern", required=True, choices=list(_CASES))
    parser.add_argument("--configs", nargs="+", required=True)
    parser.add_argument("--capability", type=int, default=90)
    args = parser.parse_args()
    (group,) = bench_groups(_CASES[args.pattern], 16384, 8)
    for tag in args.configs:
        spec = KernelSpec.make(group.pattern, group.params, 128, "bfloat16", True, KernelConfig.from_tag(tag),
                               f"sm{args.capability}")
        kernel = compile_for(spec, args.capability)
        print(f"{args.pattern:<16} {tag:<16} shared {kernel.metadata.shared:>7} B, {resource_usage(kernel)}")


if __name__ == "__main__":
    main()
