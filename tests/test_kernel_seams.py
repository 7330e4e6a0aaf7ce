"""Seams of the run-time attention kernels, on CPU: every mask shape the op takes reaches
dense and sparse groups alike (one normalisation, ``kernels.mask_4d``), and a target's
kernel configs reach the run-time config choice. (The autotune key's kernel hash is tested
in test_kernel_cache.py; the interpreted kernels with 3-D masks in test_triton_kernels.py.)"""
import sys
from pathlib import Path

import pytest
import torch

from sparsec.codegen.triton.configs import KernelConfig, candidate_configs
from sparsec.patterns import get_pattern
from sparsec.ir.plan import HeadGroup
from sparsec.runtime import kernels
from sparsec.ir import reference
from sparsec.ir.targets import Target, running_for, running_target

sys.path.insert(0, str(Path(__file__).parent))
from test_compile import TinyAttention, compile_tiny  # noqa: E402

BATCH, HEADS, KV_HEADS, N_Q, N_K, HEAD_DIM = 2, 6, 3, 13, 19, 16
# Every mask shape broadcastable to [B, Hq, n_q, n_k] that the reference takes.
MASK_SHAPES = [(N_Q, N_K), (1, N_K), (HEADS, N_Q, N_K), (1, N_Q, N_K), (HEADS, 1, N_K), (BATCH, 1, N_Q, N_K),
               (BATCH, HEADS, N_Q, N_K), (1, HEADS, 1, N_K), (BATCH, 1, 1, N_K)]


def random_mask(shape, dtype, generator) -> torch.Tensor:
    """Boolean (every row keeps key 0, so SDPA has no empty row) or additive."""
    if dtype == torch.bool:
        mask = torch.rand(shape, generator=generator) > 0.4
        mask[..., 0] = True
        return mask
    return torch.randn(shape, generator=generator) * 2


@pytest.mark.parametrize("shape", MASK_SHAPES)
def test_mask_4d_is_a_view_that_broadcasts_as_the_op_mask(shape):
    mask = torch.randn(shape)
    as_4d = kernels.mask_4d(mask)
    assert as_4d.dim() == 4 and as_4d.data_ptr() == mask.data_ptr() and as_4d._base is mask
    full = (BATCH, HEADS, N_Q, N_K)
    assert torch.equal(as_4d.expand(full), mask.expand(full))
    heads = torch.tensor([4, 1, 2])
    selected = kernels._mask_heads(as_4d, heads)
    assert torch.equal(selected.expand(BATCH, 3, N_Q, N_K), mask.expand(full)[:, heads])
    assert kernels.mask_4d(None) is None


# Dense heads as a whole-KV-group slice, as a gather, and two dense groups.
DENSE_SPLITS = [[("dense", [2, 3, 4, 5]), ("skip", [0, 1])],
                [("dense", [1, 2, 4]), ("skip", [0, 3, 5])],
                [("dense", [0, 5]), ("dense", [1, 2, 3, 4])]]


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
@pytest.mark.parametrize("shape", MASK_SHAPES)
@pytest.mark.parametrize("split", range(len(DENSE_SPLITS)))
def test_dense_groups_take_every_mask_shape(monkeypatch, shape, dtype, split):
    """The run-time path of dense groups (no Triton kernel: TRITON_INTERPRET only routes CPU
    tensors there) against the reference, for 2-, 3- and 4-D masks."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(kernels, "_CALL_PLANS", {})
    generator = torch.Generator().manual_seed(len(shape) * 10 + split)
    q = torch.randn(BATCH, HEADS, N_Q, HEAD_DIM, generator=generator)
    k, v = (torch.randn(BATCH, KV_HEADS, N_K, HEAD_DIM, generator=generator) for _ in range(2))
    mask = random_mask(shape, dtype, generator)
    groups = [HeadGroup(pattern, {}, heads) for pattern, heads in DENSE_SPLITS[split]]
    out = torch.full((BATCH, HEADS, N_Q, HEAD_DIM), float("nan"))
    kernels.sparse_attention(q, k, v, mask, 0.3, False, groups, out=out, autotune=False)
    torch.testing.assert_close(out, reference.sparse_attention(q, k, v, mask, 0.3, False, groups),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind,params", [("vertical_slash", {"vertical": [3, 0], "slash": [2, 0], "queries": 5}),
                                         ("dynamic_blocks", {"block": 4, "samples": 2, "share": 0.7, "density": [0.5, 16, 0]})])
@pytest.mark.parametrize("shape", [(HEADS, N_Q, N_K), (N_Q, N_K), (1, HEADS, N_Q, N_K)])
def test_dynamic_estimate_takes_every_mask_shape(shape, kind, params):
    """The kernels' estimate (the estimating queries and their mask rows only) equals the reference's."""
    generator = torch.Generator().manual_seed(3)
    q = torch.randn(1, HEADS, N_K, HEAD_DIM, generator=generator)
    k = torch.randn(1, KV_HEADS, N_K, HEAD_DIM, generator=generator)
    mask = random_mask(shape[:-2] + (N_K, N_K), torch.bool, generator)
    group = HeadGroup(kind, params, [5, 0, 3])
    heads = torch.tensor(group.heads)
    expected = get_pattern(kind).estimate_indices(
        group.params, q[:, heads], k[:, heads // 2], 0.25, True, mask.expand(1, HEADS, N_K, N_K)[:, heads])
    for got, want in zip(kernels.estimate_dynamic(q, k, group, 0.25, True, mask), expected):
        assert torch.equal(torch.as_tensor(got), torch.as_tensor(want))


# -- a target's kernel configs reach the run-time choice --------------------------------------

ONE_CONFIG = KernelConfig(32, 16, 2, 1)


def one_config_target(arch: str = "cpu") -> Target:
    return Target("one-config", arch, "cpu" if arch == "cpu" else "cuda", peak_tflops=1.0, bandwidth_gbs=1.0,
                  launch_overhead_us=1.0, kernel_configs={"attention": [ONE_CONFIG.to_dict()]})


def test_candidate_configs_take_a_target_of_the_same_arch_family_only():
    assert candidate_configs("sm90", "bfloat16", 128, one_config_target("sm90")) == (ONE_CONFIG,)
    assert candidate_configs("sm90", "bfloat16", 128, one_config_target("sm80")) == \
        candidate_configs("sm90", "bfloat16", 128)


def test_run_time_config_is_the_running_targets_one_config():
    generator = torch.Generator().manual_seed(5)
    q = torch.randn(1, 2, 21, HEAD_DIM, generator=generator)
    group = kernels._Group(q, q[:, :1], q[:, :1], None, 0.25, True, HeadGroup("window", {"window": [4, 0]}, [0, 1]))
    default = kernels._choose_config(group, autotune=True)
    assert default != ONE_CONFIG
    with running_for(one_config_target()):
        assert kernels._choose_config(group, autotune=True) == ONE_CONFIG
    assert running_target() is None and kernels._choose_config(group, autotune=True) == default


def test_compiled_model_runs_its_calls_for_its_target():
    torch.manual_seed(0)
    compiled = compile_tiny(TinyAttention().eval(), torch.randn(2, 20, 32), target="h100")
    seen = []
    compiled._runner = lambda *args, **kwargs: seen.append(running_target())
    with pytest.warns(UserWarning, match="reference kernels"):          # an h100 model on CPU tensors
        compiled(torch.randn(2, 20, 32))
    assert [target.name for target in seen] == ["h100"] and running_target() is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_prepared_site_call_never_waits_for_the_gpu():
    """A prepared site's call only issues work: no host-to-device copy per call. A head index
    built from a list in every call made each call of a site with gathered dense heads wait
    until the GPU queue drained (measured on an H200: ~76 ms a call behind a busy GPU)."""
    generator = torch.Generator(device="cuda").manual_seed(3)
    q = torch.randn(2, 6, 300, 64, device="cuda", dtype=torch.bfloat16, generator=generator)
    k, v = (torch.randn(2, 3, 300, 64, device="cuda", dtype=torch.bfloat16, generator=generator) for _ in range(2))
    groups = [HeadGroup("sink_window", {"sink": [4, 0], "window": [64, 0]}, [1, 2, 3]),
              HeadGroup("vertical_slash", {"queries": 64, "vertical": [16, 0], "slash": [16, 0]}, [4, 5]),
              HeadGroup("dense", {}, [0])]                      # one head of a KV group: gathered
    expected = reference.sparse_attention(q, k, v, None, 0.125, True, groups)
    kernels.sparse_attention(q, k, v, None, 0.125, True, groups)           # prepares (compiles, tunes)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = kernels.sparse_attention(q, k, v, None, 0.125, True, groups)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=2e-2)


def test_shape_caches_are_bypassed_while_a_cuda_graph_is_captured(monkeypatch):
    """A graph must not read a cached table the cache may later free: while a stream is
    captured the function runs again (its tensors then belong to the graph)."""
    from sparsec.ir.shape_cache import shape_cache

    calls = []

    @shape_cache(maxsize=4)
    def table(n):
        calls.append(n)
        return torch.arange(n)

    cached = table(3)
    assert table(3) is cached and calls == [3]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    captured = table(3)
    assert captured is not cached and calls == [3, 3] and torch.equal(captured, cached)
