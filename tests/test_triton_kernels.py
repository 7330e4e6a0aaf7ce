"""Generated Triton attention kernels against the reference op (sparsec/ir/reference.py).

CPU: every kernel family under ``TRITON_INTERPRET=1`` at small shapes, with randomised
lengths (not multiples of the block, n_q below, equal to and above n_k), batch, heads,
GQA ratio, head dim (16, 32, and 40 through the padding path), dtype, causal, user mask
and pattern parameters, on fresh random inputs; outputs are poisoned with NaN first so
every element must be written. GPU (``pytest -m gpu``): the same cases at real sizes,
through ``torch.ops.sparsec.sparse_attention`` on CUDA tensors.
"""
from __future__ import annotations

import multiprocessing
import random
from pathlib import Path

import pytest
import torch

import sparsec  # noqa: F401  (registers the ops and the CUDA kernel)
from sparsec.tools.bench import CASES, _flex_mask_mod, bench_groups, flex_block_mask
from sparsec.codegen.triton.block_mass import dynamic_blocks_estimate, row_block_mass
from sparsec.codegen.triton.configs import KernelConfig, candidate_configs
from sparsec.codegen.triton.generator import KernelSpec, generate, site_kernels, write_if_different, write_kernels
from sparsec.patterns import get_pattern
from sparsec.patterns.shared import estimating_probs
from sparsec.ir.plan import AttentionSite, HeadGroup, encode_groups
from sparsec.runtime import cpu_attention, kernels
from sparsec.ir import reference
from sparsec.testing.oracle import float64_attention
from sparsec.testing.triton_interpreter import interpreter_worker

FAMILIES = ["window", "sink_window", "vertical_stripe", "multi_diagonal", "block_topk", "vertical_slash",
            "dynamic_blocks"]
TOLERANCE = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2.5e-2}
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def interpreter():
    """``(pool, kernel cache)``: a spawned worker running Triton's CPU interpreter."""
    with interpreter_worker() as worker:
        yield worker


def _elastic(rng: random.Random, low: int, high: int, n: int) -> list:
    """A size: constant, or (one time in three) proportional to the length."""
    if rng.random() < 0.33:
        return [float(rng.randint(0, low)), round(rng.uniform(0.02, high / n), 3)]
    return [rng.randint(low, high), 0]


def random_params(family: str, rng: random.Random, n: int) -> dict:
    if family == "window":
        return {"window": _elastic(rng, 1, max(2, n // 3), n)}
    if family == "sink_window":
        return {"sink": _elastic(rng, 1, 40, n), "window": _elastic(rng, 1, max(2, n // 4), n)}
    if family == "vertical_stripe":
        columns = rng.sample(range(n + 20), rng.randint(1, 12))          # some past the end
        return {"columns": columns, "window": _elastic(rng, 1, 16, n)}
    if family == "multi_diagonal":
        period = rng.randint(3, max(4, n // 3))
        return {"period": [period, 0], "width": [rng.randint(1, period), 0], "count": rng.randint(0, 3)}
    if family == "block_topk":
        block = rng.choice([8, 16, 32])
        grid_q, grid_k = rng.randint(2, 6), rng.randint(2, 6)
        blocks = [[i, j] for i in range(grid_q) for j in range(grid_k) if rng.random() < 0.3]
        return {"block": block, "grid": [grid_q, grid_k], "blocks": blocks}
    if family == "vertical_slash":
        return {"vertical": _elastic(rng, 1, 10, n), "slash": _elastic(rng, 1, 10, n),
                "queries": rng.randint(4, 40)}
    if family == "dynamic_blocks":
        block = rng.choice([8, 16, 32])
        return {"block": block, "samples": rng.randint(1, 6), "share": rng.choice([0.5, 0.8, 0.95]),
                "density": [0.5, n, 0]}
    raise ValueError(family)


def random_case(family: str, seed: int, device: str, lengths: tuple[int, int], head_dims, num_kv_heads,
                ratios, batches):
    """Inputs and a group table: ``family`` on a random (non-contiguous) head subset, the
    other heads dense or skip."""
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    batch, kv_heads, ratio = rng.choice(batches), rng.choice(num_kv_heads), rng.choice(ratios)
    heads = kv_heads * ratio
    n_k = rng.randint(*lengths)
    n_q = rng.choice([n_k, n_k, rng.randint(max(1, n_k // 3), n_k), min(lengths[1], n_k + rng.randint(1, 20))])
    head_dim = rng.choice(head_dims)
    dtype = rng.choice([torch.float32, torch.float16, torch.bfloat16])
    causal = rng.random() < 0.6

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    q = randn(batch, heads, n_q, head_dim)
    k, v = randn(batch, kv_heads, n_k, head_dim), randn(batch, kv_heads, n_k, head_dim)
    mask_kind = rng.choice(["none", "none", "bool", "bool_heads", "additive"])
    mask = None
    if mask_kind == "bool":              # key padding, broadcast over heads and queries
        mask = torch.rand(batch, 1, 1, n_k, generator=generator) > 0.2
    elif mask_kind == "bool_heads":      # per head, with some fully masked query rows
        mask = torch.rand(batch, heads, n_q, n_k, generator=generator) > 0.3
        mask[:, :, : max(1, n_q // 8)] = False
    elif mask_kind == "additive":
        mask = (torch.randn(n_q, n_k, generator=generator) * 2).to(dtype)
    mask = mask.to(device) if mask is not None else None
    order = rng.sample(range(heads), heads)
    split = rng.randint(1, heads)
    other = "skip" if mask_kind == "bool_heads" or rng.random() < 0.5 else "dense"   # SDPA gives NaN on empty rows
    groups = [HeadGroup(family, random_params(family, rng, n_k), sorted(order[:split]))]
    if split < heads:
        groups.append(HeadGroup(other, {}, sorted(order[split:])))
    scale = head_dim ** -0.5 * rng.uniform(0.5, 2.0)
    return q, k, v, mask, scale, causal, groups


def assert_matches(out: torch.Tensor, expected: torch.Tensor) -> None:
    assert not out.isnan().any(), "an output element was not written (NaN poison left)"
    tolerance = TOLERANCE[out.dtype]
    torch.testing.assert_close(out, expected, atol=tolerance, rtol=tolerance)


def _run_poisoned(q, k, v, mask, scale, causal, groups):
    out = torch.full(q.shape[:-1] + (v.shape[-1],), float("nan"), dtype=q.dtype, device=q.device)
    kernels.sparse_attention(q, k, v, mask, scale, causal, groups, out=out, autotune=False)
    return out


def _interpreted(case) -> tuple[torch.Tensor, torch.Tensor]:
    """In the interpreter worker: (kernel output over a NaN-poisoned buffer, reference)."""
    return _run_poisoned(*case), reference.sparse_attention(*case)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("family", FAMILIES)
def test_family_matches_reference_interpreted(interpreter, family, seed):
    """Random shapes, GQA, dtypes, n_q != n_k, masks and parameters: the kernel against the
    reference and against the independent float64 oracle."""
    case = random_case(family, 1000 * FAMILIES.index(family) + seed, "cpu", lengths=(17, 100),
                       head_dims=[16, 32, 40], num_kv_heads=[1, 2], ratios=[1, 2, 3], batches=[1, 2])
    out, expected = interpreter[0].apply(_interpreted, (case,))
    assert_matches(out, expected)
    q, k, _v, _mask, _scale, causal, _groups = case
    if not causal or q.shape[-2] == k.shape[-2]:     # causal with n_q != n_k: the op refuses it
        assert_matches(out, float64_attention(*case).to(out.dtype))


def _interpreted_twice(case):
    """Two calls of one input signature with fresh values: the second reuses the prepared launches."""
    first = _interpreted(case)
    q, k, v, *rest = case
    return first, _interpreted((torch.randn_like(q), torch.randn_like(k), torch.randn_like(v), *rest))


@pytest.mark.parametrize("family", ["block_topk", "vertical_slash", "dynamic_blocks"])
def test_repeated_calls_read_their_own_inputs_interpreted(interpreter, family):
    case = random_case(family, 77, "cpu", lengths=(40, 90), head_dims=[32], num_kv_heads=[2], ratios=[2],
                       batches=[2])
    for out, expected in interpreter[0].apply(_interpreted_twice, (case,)):
        assert_matches(out, expected)


def _fused_and_torch_estimates(case):
    """In the interpreter worker: the row masses of the kernel and of torch's softmax, and
    the layouts of the fused and the reference estimate."""
    q, k, params, heads, causal, chunk_tiles = case
    family = get_pattern("dynamic_blocks")
    rows = family.estimating_rows(params, q.shape[2])
    kv = heads // (q.shape[1] // k.shape[1])
    probs = estimating_probs(q[:, heads][:, :, rows], rows, q.shape[2], k[:, kv], 0.3, causal)[0]
    blocks = -(-k.shape[2] // params["block"])
    torch_mass = torch.nn.functional.pad(probs, (0, blocks * params["block"] - k.shape[2]))
    torch_mass = torch_mass.view(*probs.shape[:-1], blocks, params["block"]).sum(-1)
    return (row_block_mass(q, k, heads, rows, 0.3, causal, params["block"], chunk_tiles), torch_mass,
            dynamic_blocks_estimate(params, q, k, heads, rows, 0.3, causal)[0],
            family.estimate_indices(params, q[:, heads], k[:, kv], 0.3, causal)[0])


@pytest.mark.parametrize("seed", range(6))
def test_fused_block_mass_estimate_matches_the_torch_estimate_interpreted(interpreter, seed):
    """``dynamic_blocks``' one-kernel estimate: every estimating row's mass per key block
    against the softmax in torch, and the layout against the reference's, at random lengths
    (off the block, n_q below and above n_k: causal rows with no key), GQA, head dims 16-40,
    dtypes, blocks 4-64, a head subset out of order, and the keys in 1 to 3 chunks."""
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    n_k = rng.randint(20, 150)
    n_q = rng.choice([n_k, rng.randint(5, n_k), n_k + rng.randint(1, 30)])
    kv_heads, ratio, head_dim = rng.choice([1, 2]), rng.choice([1, 2, 3]), rng.choice([16, 32, 40])
    dtype = rng.choice([torch.float32, torch.float16, torch.bfloat16])
    q = torch.randn(2, kv_heads * ratio, n_q, head_dim, generator=generator).to(dtype)
    k = torch.randn(2, kv_heads, n_k, head_dim, generator=generator).to(dtype)
    params = {"block": rng.choice([4, 8, 16, 64]), "samples": rng.randint(1, 6), "share": rng.choice([0.5, 0.9]),
              "density": [0.5, n_k, 0]}
    heads = torch.tensor(rng.sample(range(kv_heads * ratio), rng.randint(1, kv_heads * ratio)))
    causal = seed % 3 != 2
    chunk_tiles = 1 if seed % 2 else 8           # odd seeds: 64-key chunks, 1-3 a row
    fused, torch_mass, fused_layout, layout = interpreter[0].apply(
        _fused_and_torch_estimates, ((q, k, params, heads, causal, chunk_tiles),))
    torch.testing.assert_close(fused, torch_mass, atol=1e-5, rtol=1e-4)
    assert torch.equal(fused_layout, layout)


def test_mixed_groups_one_call_interpreted(interpreter):
    """Every family in one call, on interleaved head lists, with GQA."""
    rng = random.Random(7)
    generator = torch.Generator().manual_seed(7)
    batch, kv_heads, ratio, n, head_dim = 2, 3, 3, 53, 32          # a head per family, dense and skip
    q = torch.randn(batch, kv_heads * ratio, n, head_dim, generator=generator, dtype=torch.bfloat16)
    k = torch.randn(batch, kv_heads, n, head_dim, generator=generator, dtype=torch.bfloat16)
    v = torch.randn(batch, kv_heads, n, head_dim, generator=generator, dtype=torch.bfloat16)
    patterns = FAMILIES + ["dense", "skip"]
    groups = [HeadGroup(p, random_params(p, rng, n) if p in FAMILIES else {}, [h]) for h, p in enumerate(patterns)]
    assert_matches(*interpreter[0].apply(_interpreted, ((q, k, v, None, head_dim ** -0.5, True, groups),)))


def test_kernel_source_is_readable_and_named_by_parameters():
    spec = KernelSpec.make("sink_window", {"sink": [128, 0], "window": [512, 0]}, 128, "bfloat16", True,
                           KernelConfig(128, 64, 8, 3), "sm90")
    kernel = generate(spec, plan_entry="site layers.0.attn (layer 0), heads [0, 1]")
    assert kernel.filename.startswith("sink_window_sink128_window512_d128_bf16_causal_m128n64w8s3_sm90_")
    assert kernel.filename == generate(spec, plan_entry="site layers.0.attn (layer 0), heads [0, 1]").filename
    assert "Plan entry: site layers.0.attn (layer 0), heads [0, 1]" in kernel.source
    assert "'HAS_SINK': True" in kernel.source and "def _sparse_attention_fwd(" in kernel.source
    compile(kernel.source, kernel.filename, "exec")
    other = generate(KernelSpec.make("sink_window", {"sink": [64, 0], "window": [512, 0]}, 128, "bfloat16",
                                     True, KernelConfig(128, 64, 8, 3), "sm90"))
    assert other.filename != kernel.filename


def test_config_tags_round_trip_and_env_override(monkeypatch):
    for config in candidate_configs("sm90", "bfloat16", 128):
        assert KernelConfig.from_tag(config.tag) == config
    with pytest.raises(ValueError, match="m<block_m>n<block_n>"):
        KernelConfig.from_tag("m64n64")
    monkeypatch.setenv("SPARSEC_ATTENTION_CONFIGS", "m64n32w4s2, m128n128w8s3tma")
    assert candidate_configs("sm80", "float32", 256) == (KernelConfig(64, 32, 4, 2),
                                                          KernelConfig(128, 128, 8, 3, True))


def test_a100_sources_without_a_gpu_written_only_if_different(tmp_path):
    site = AttentionSite("layers.0.attn", 0, num_heads=4, num_kv_heads=2, head_dim=64, causal=True,
                         groups=[HeadGroup("window", {"window": [256, 0]}, [0, 1]),
                                 HeadGroup("block_topk", {"block": 64, "grid": [4, 4], "blocks": [[1, 0]]}, [2]),
                                 HeadGroup("dense", {}, [3])])
    generated = site_kernels(site, "a100")
    assert [k.spec.pattern for k in generated] == ["window", "block_topk"]
    assert all(k.spec.arch == "sm80" and "_sm80_" in k.filename for k in generated)
    paths = write_kernels(generated, tmp_path)
    first = [p.stat().st_mtime_ns for p in paths]
    assert not write_if_different(paths[0], generated[0].source)
    write_kernels(generated, tmp_path)
    assert [p.stat().st_mtime_ns for p in paths] == first


def _write_many(args):
    path, text = args
    for _ in range(20):
        write_if_different(path, text)
    return path.read_text() == text


def test_cache_writes_are_safe_across_processes(tmp_path):
    text = generate(KernelSpec.make("window", {"window": [8, 0]}, 32, "float32", True,
                                    KernelConfig(16, 16, 4, 1), "cpu")).source
    with multiprocessing.get_context("fork").Pool(3) as pool:      # children only write files
        assert all(pool.map(_write_many, [(tmp_path / "kernel.py", text)] * 3))
    assert (tmp_path / "kernel.py").read_text() == text
    assert not list(tmp_path.glob("*.tmp"))


def test_runtime_cache_follows_sparsec_cache_dir(interpreter):
    q = torch.randn(1, 2, 20, 16)
    case = (q, q[:, :1], q[:, :1], None, 0.25, True, [HeadGroup("window", {"window": [4, 0]}, [0, 1])])
    assert_matches(*interpreter[0].apply(_interpreted, (case,)))
    written = list(interpreter[1].glob("attention-v*/cpu/window_window4_d16_f32_causal_*.py"))
    assert len(written) == 1


# -- GPU: the same cases at real sizes (each at its default config; the op test autotunes) --

@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("family", FAMILIES)
def test_family_matches_reference_gpu(family, seed):
    case = random_case(family, 5000 + 1000 * FAMILIES.index(family) + seed, "cuda", lengths=(300, 4200),
                       head_dims=[64, 128, 80], num_kv_heads=[2, 4], ratios=[1, 4], batches=[1, 2])
    assert_matches(_run_poisoned(*case), reference.sparse_attention(*case))


@pytest.mark.gpu
@gpu
def test_op_uses_kernels_on_cuda_and_reference_on_cpu():
    q = torch.randn(1, 4, 1000, 64, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn_like(q), torch.randn_like(q)
    groups = [HeadGroup("sink_window", {"sink": [64, 0], "window": [128, 0]}, [0, 2]),
              HeadGroup("block_topk", {"block": 64, "grid": [8, 8], "blocks": [[5, 1], [7, 0]]}, [1, 3])]
    through_op = torch.ops.sparsec.sparse_attention(q, k, v, None, 0.125, True, encode_groups(groups))
    direct = kernels.sparse_attention(q, k, v, None, 0.125, True, groups)
    torch.testing.assert_close(through_op, direct, atol=0, rtol=0)
    on_cpu = torch.ops.sparsec.sparse_attention(q.cpu(), k.cpu(), v.cpu(), None, 0.125, True,
                                                encode_groups(groups))
    cpu_path = cpu_attention.sparse_attention(q.cpu(), k.cpu(), v.cpu(), None, 0.125, True, groups)
    torch.testing.assert_close(on_cpu, cpu_path, atol=0, rtol=0)          # CPU tensors: the block-sparse path
    expected = reference.sparse_attention(q.cpu(), k.cpu(), v.cpu(), None, 0.125, True, groups)
    torch.testing.assert_close(on_cpu, expected, atol=TOLERANCE[torch.bfloat16], rtol=TOLERANCE[torch.bfloat16])


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("family", ["vertical_slash", "dynamic_blocks"])
@pytest.mark.parametrize("seed", range(2))
def test_dynamic_estimates_replayed_as_cuda_graphs_read_each_call_inputs_gpu(family, seed, monkeypatch):
    """A dynamic group's estimate and tables run eagerly on the first call of a signature and
    as a CUDA graph after: every call, fresh values each, equals the reference and, bitwise,
    the eager path."""
    rng = random.Random(9000 + seed)
    batch, n, head_dim, dtype = seed + 1, rng.randint(700, 2500), [64, 128][seed], [torch.bfloat16, torch.float32][seed]
    q = torch.randn(batch, 6, n, head_dim, device="cuda", dtype=dtype)
    k, v = (torch.randn(batch, 2, n, head_dim, device="cuda", dtype=dtype) for _ in range(2))
    scale, causal = head_dim ** -0.5, seed == 0
    groups = [HeadGroup(family, random_params(family, rng, n), [0, 2, 3, 5]), HeadGroup("dense", {}, [1, 4])]
    replays, replay = [], torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda graph: (replays.append(graph), replay(graph))[1])
    for call in range(3):
        if call:
            q, k, v = torch.randn_like(q), torch.randn_like(k), torch.randn_like(v)
        monkeypatch.setenv("SPARSEC_ESTIMATE_GRAPHS", "1")
        out = _run_poisoned(q, k, v, None, scale, causal, groups)
        assert_matches(out, reference.sparse_attention(q, k, v, None, scale, causal, groups))
        monkeypatch.setenv("SPARSEC_ESTIMATE_GRAPHS", "0")
        torch.testing.assert_close(out, _run_poisoned(q, k, v, None, scale, causal, groups), atol=0, rtol=0)
    assert len(replays) == 2, "calls after the first of a signature replay its graph"


@pytest.mark.gpu
@gpu
def test_dynamic_estimate_graphs_outlive_the_autotune_gpu(monkeypatch, tmp_path):
    """The autotune times every candidate config, each with its own graph, and drops them:
    later captures into the shared pool still hold (torch's allocator asserted when the pool's
    graphs had all died), and torch's CUDA generator is left usable."""
    import warnings

    monkeypatch.setenv("SPARSEC_ESTIMATE_GRAPHS", "1")
    monkeypatch.setenv("SPARSEC_CACHE_DIR", str(tmp_path))         # nothing tuned yet
    monkeypatch.setattr(kernels, "_TUNED", {})
    n, scale = 1500, 64 ** -0.5
    groups = [HeadGroup("dynamic_blocks", {"block": 64, "samples": 16, "share": 0.9, "density": [0.5, n, 0]},
                        list(range(8)))]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            q = torch.randn(1, 8, n, 64, device="cuda", dtype=torch.bfloat16)
            k, v = (torch.randn(1, 2, n, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
            out = kernels.sparse_attention(q, k, v, None, scale, True, groups, autotune=True)
            assert_matches(out, reference.sparse_attention(q, k, v, None, scale, True, groups))
    assert not [w for w in caught if "could not be captured" in str(w.message)]
    assert torch.randn(4, device="cuda").isfinite().all()


@pytest.mark.parametrize("case", CASES)
def test_bench_flex_masks_are_the_pattern_masks(case):
    """The benchmark's FlexAttention mask_mods compute exactly sparsec's pattern masks."""
    n, num_heads, scale = 300, 8, 0.125
    groups = bench_groups(case, n, num_heads)
    q, k = torch.randn(1, num_heads, n, 32), torch.randn(1, num_heads // 2, n, 32)
    estimates = {i: kernels.estimate_dynamic(q, k, g, scale, True)
                 for i, g in enumerate(groups) if get_pattern(g.pattern).dynamic}
    mask_mod = _flex_mask_mod(groups, n, num_heads, "cpu", estimates)
    positions = torch.arange(n)
    for i, group in enumerate(groups):
        pattern = get_pattern(group.pattern)
        for slot, head in enumerate(group.heads[:2]):
            if pattern.dynamic:
                expected = pattern.dynamic_mask(*estimates[i], n, n, True)[0, slot]
            else:
                expected = pattern.mask(group.params, n, n, True)
            got = mask_mod(0, torch.tensor(head), positions[:, None], positions[None, :])
            assert torch.equal(got, expected), (case, group.pattern, head)


@pytest.mark.parametrize("case", [case for case in CASES
                                  if not any(get_pattern(g.pattern).dynamic for g in bench_groups(case, 300, 8))])
def test_bench_flex_block_masks_keep_exactly_the_pattern(case):
    """The BlockMask built from the block tables computes every kept pair (partial blocks
    through the mask_mod, full blocks unmasked) and nothing else."""
    n, num_heads, block = 300, 8, 128
    groups = bench_groups(case, n, num_heads)
    block_mask = flex_block_mask(groups, n, 1, num_heads, "cpu", {})
    computed = block_mask.to_dense().bool()                  # [1, H or 1, query blocks, key blocks]
    full = torch.zeros_like(computed)
    for head in range(full.shape[1]):
        for row in range(full.shape[2]):
            count = int(block_mask.full_kv_num_blocks[0, head, row])
            full[0, head, row, block_mask.full_kv_indices[0, head, row, :count].long()] = True
    assert (computed | ~full).all()
    partial = computed & ~full
    positions = torch.arange(n)
    for group in groups:
        expected = get_pattern(group.pattern).mask(group.params, n, n, True)
        for head in group.heads[:2]:
            row = head if partial.shape[1] > 1 else 0
            expand = lambda blocks: blocks[0, row].repeat_interleave(block, 0).repeat_interleave(block, 1)[:n, :n]
            masked = block_mask.mask_mod(0, torch.tensor(head), positions[:, None], positions[None, :])
            got = expand(full) | (expand(partial) & masked)
            assert torch.equal(got, expected), (case, group.pattern, head)


@pytest.mark.parametrize("case", ["block_topk", "mixed"])
def test_compiled_flex_attention_with_the_bench_masks_equals_the_reference(case):
    """FlexAttention compiled whole-graph (as the benchmark runs it) lowers the families'
    mask_mods, lookup tables included, and computes sparsec's attention (GQA, n not a
    multiple of the block)."""
    from torch.nn.attention.flex_attention import flex_attention

    n, num_heads, scale = 300, 8, 0.125
    groups = bench_groups(case, n, num_heads)
    q, k, v = torch.randn(1, num_heads, n, 32), torch.randn(1, 2, n, 32), torch.randn(1, 2, n, 32)
    flex = torch.compile(flex_attention, dynamic=False, fullgraph=True)
    got = flex(q, k, v, block_mask=flex_block_mask(groups, n, 1, num_heads, "cpu", {}), scale=scale, enable_gqa=True)
    torch.testing.assert_close(got, reference.sparse_attention(q, k, v, None, scale, True, groups),
                               atol=1e-5, rtol=1e-5)


def test_vertical_slash_with_more_queries_than_keys_falls_back_to_the_reference():
    """Only vertical_slash's kernel (its offset map) needs a key for every query offset."""
    from sparsec.runtime.kernels import _kernel_unsupported

    q, k = torch.randn(1, 2, 9, 16), torch.randn(1, 2, 5, 16)
    group = HeadGroup("vertical_slash", {"vertical": [2, 0], "slash": [2, 0], "queries": 4}, [0, 1])
    assert _kernel_unsupported(q, k, k, group) == "vertical_slash with more queries than keys"
    assert _kernel_unsupported(k, q, q, group) == ""
    blocks = HeadGroup("dynamic_blocks", {"block": 4, "samples": 2, "share": 0.8, "density": [0.5, 5, 0]}, [0, 1])
    assert _kernel_unsupported(q, k, k, blocks) == ""


@pytest.mark.parametrize("causal", [True, False])
def test_dynamic_blocks_with_more_queries_than_keys_interpreted(interpreter, causal):
    """Through the kernel (causal: the first rows keep no key), against the reference."""
    generator = torch.Generator().manual_seed(8)
    q = torch.randn(2, 4, 53, 16, generator=generator)
    k, v = (torch.randn(2, 2, 30, 16, generator=generator) for _ in range(2))
    groups = [HeadGroup("dynamic_blocks", {"block": 8, "samples": 3, "share": 0.7, "density": [0.5, 30, 0]}, [3, 0]),
              HeadGroup("dense", {}, [1, 2])]
    out, expected = interpreter[0].apply(_interpreted, ((q, k, v, None, 0.25, causal, groups),))
    assert_matches(out, expected)


# -- masks of every shape, and the running target's kernel configs ---------------------------

def _per_head_mask_case(mask_dtype: torch.dtype, dense_heads: list[int]):
    """Every family, dense and (where a head is left) skip, one head each, under a 3-D per-head
    mask (boolean ``[H, n, n]`` or additive ``[H, 1, n]``); dense heads gathered or sliced."""
    rng = random.Random(11)
    generator = torch.Generator().manual_seed(11)
    batch, kv_heads, ratio, n, head_dim = 2, 5, 2, 45, 16
    q = torch.randn(batch, kv_heads * ratio, n, head_dim, generator=generator)
    k, v = (torch.randn(batch, kv_heads, n, head_dim, generator=generator) for _ in range(2))
    if mask_dtype == torch.bool:
        mask = torch.rand(kv_heads * ratio, n, n, generator=generator) > 0.3
        mask[..., 0] = True                # no empty row: SDPA (the dense heads) would give NaN there
    else:
        mask = torch.randn(kv_heads * ratio, 1, n, generator=generator) * 2
    groups = [HeadGroup(p, random_params(p, rng, n), [h]) for h, p in enumerate(FAMILIES)]
    groups.append(HeadGroup("dense", {}, dense_heads))
    rest = [h for h in range(len(FAMILIES), kv_heads * ratio) if h not in dense_heads]
    if rest:
        groups.append(HeadGroup("skip", {}, rest))
    return q, k, v, mask, head_dim ** -0.5, False, groups      # SDPA refuses a mask with is_causal


@pytest.mark.parametrize("mask_dtype,dense_heads", [(torch.bool, [7]), (torch.float32, [7, 8])])
def test_per_head_3d_masks_reach_every_group_interpreted(interpreter, mask_dtype, dense_heads):
    assert_matches(*interpreter[0].apply(_interpreted, (_per_head_mask_case(mask_dtype, dense_heads),)))


def _interpreted_for_target(case, target):
    """In the interpreter worker: the kernel output under ``running_for(target)``, the
    reference, and the file names of the kernels loaded."""
    from sparsec.ir.targets import running_for

    kernels._MODULES.clear()
    with running_for(target):
        out = _run_poisoned(*case)
    return out, reference.sparse_attention(*case), [Path(path).name for path, _ in kernels._MODULES]


def test_running_targets_kernel_config_is_the_one_launched_interpreted(interpreter):
    from sparsec.ir.targets import Target

    config = KernelConfig(32, 16, 2, 1)
    target = Target("one-config", "cpu", "cpu", peak_tflops=1.0, bandwidth_gbs=1.0, launch_overhead_us=1.0,
                    kernel_configs={"attention": [config.to_dict()]})
    q = torch.randn(1, 2, 50, 16, generator=torch.Generator().manual_seed(4))
    case = (q, q[:, :1], q[:, :1], None, 0.25, True, [HeadGroup("window", {"window": [9, 0]}, [0, 1])])
    interpreter[0].apply(_interpreted, (case,))                  # the same signature, run first without it
    out, expected, loaded = interpreter[0].apply(_interpreted_for_target, (case, target))
    assert_matches(out, expected)
    assert loaded and all(f"_{config.tag}_cpu_" in name for name in loaded)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("mask_dtype,dense_heads", [(torch.bool, [7]), (torch.float32, [7, 8])])
def test_per_head_3d_masks_reach_every_group_gpu(mask_dtype, dense_heads):
    q, k, v, mask, scale, causal, groups = _per_head_mask_case(mask_dtype, dense_heads)
    case = (*(t.cuda() for t in (q, k, v, mask)), scale, causal, groups)
    through_op = torch.ops.sparsec.sparse_attention(*case[:-1], encode_groups(groups))
    assert_matches(through_op, reference.sparse_attention(*case))


@pytest.mark.gpu
@gpu
def test_compiled_model_launches_its_targets_kernel_config_gpu(monkeypatch):
    import sys

    import sparsec
    sys.path.insert(0, str(Path(__file__).parent))
    from test_compile import TinyAttention, compile_tiny

    config = KernelConfig(32, 32, 4, 2)
    arch = kernels.device_arch(torch.device("cuda"))
    target = sparsec.register_target(sparsec.Target(
        f"{arch}-one-config", arch, "cuda", peak_tflops=1.0, bandwidth_gbs=1.0, launch_overhead_us=1.0,
        kernel_configs={"attention": [config.to_dict()]}))
    monkeypatch.setattr(kernels, "_MODULES", {})
    model = TinyAttention().eval().cuda()
    compiled = compile_tiny(model, torch.randn(2, 20, 32, device="cuda"), target=target)
    with torch.no_grad():
        compiled(torch.randn(2, 300, 32, device="cuda"))
    loaded = [Path(path).name for path, _ in kernels._MODULES]
    assert loaded and all(f"_{config.tag}_{arch}_" in name for name in loaded)
