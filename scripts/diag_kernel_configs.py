#!/usr/bin/env python3
"""Run one random test case (tests/test_triton_kernels.py) at each given kernel config and
print the error against the reference per config: tells a config-specific miscompile from a
logic error.   python3 scripts/diag_kernel_configs.py FAMILY SEED [m,n,warps,stages ...]"""
import sys

import torch

sys.path.insert(0, "tests")
import test_triton_kernels as cases  # noqa: E402
from sparsec.codegen.triton.configs import KernelConfig  # noqa: E402
from sparsec.runtime import kernels, reference  # noqa: E402

family, seed = sys.argv[1], int(sys.argv[2])
configs = [KernelConfig(*map(int, c.split(","))) for c in sys.argv[3:]] or [KernelConfig(64, 64, 4, 1)]
case = cases.random_case(family, 5000 + 1000 * cases.FAMILIES.index(family) + seed, "cuda", lengths=(300, 4200),
                         head_dims=[64, 128, 80], num_kv_heads=[2, 4], ratios=[1, 4], batches=[1, 2])
q, k, v, mask, scale, causal, groups = case
print(family, seed, tuple(q.shape), tuple(k.shape), q.dtype, "causal" if causal else "full", groups[0])
expected = reference.sparse_attention(*case)
heads = groups[0].heads
for config in configs:
    kernels.candidate_configs = lambda *a, config=config, **kw: (config,)
    kernels._CALL_PLANS.clear()                       # prepared launches are keyed by signature, not config
    out = torch.full_like(expected, float("nan"))
    kernels.sparse_attention(*case, out=out, autotune=False)
    error = (out.float() - expected.float()).abs()[:, heads].amax(dim=(0, 1, 3))
    bad = (error > 0.05).nonzero().flatten()
    print(f"{config.tag}: max err {error.max():.3g}, bad rows {len(bad)} first {bad[:8].tolist()} "
          f"nan {out.isnan().sum().item()}", flush=True)
