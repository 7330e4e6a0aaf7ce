"""Every registered pattern family through every backend, against its reference mask.

At awkward shapes (n_q != n_k, lengths not a multiple of the block, causal and not):
the reference mask (``Pattern.mask``), the block layout (every kept pair inside a kept
block, full blocks wholly kept), the CPU block-sparse runtime, the ONNX decomposition (the
family's ``index_keep`` emitted as ONNX ops, evaluated op by op by onnxruntime through
onnxscript's eager mode), FlexAttention's mask_mod (``create_mask`` on the index grid) and
the Triton kernels under ``TRITON_INTERPRET=1`` (one shape per family: they are slow).
The dynamic families (``vertical_slash``, ``dynamic_blocks``) are compared given the same
estimate.

A ninth family, ``dilated_window``, is defined only here and registered through the public
registry: it runs through the same backends without any library file knowing it.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn.attention.flex_attention import create_mask

from sparsec.codegen.onnx import decompose
from sparsec.patterns import Pattern, backend_piece, get_pattern, pattern_kinds, register, unregister
from sparsec.patterns.base import offsets
from sparsec.ir.plan import HeadGroup
from sparsec.runtime import cpu_attention, sparse_tables  # noqa: F401  (registers the Triton tables pieces)
from sparsec.ir import reference
from sparsec.testing.triton_interpreter import interpreter_worker


class DilatedWindow(Pattern):
    """Every other offset of a window: ``0 <= |d| < window`` and ``d`` even. Only the mask is
    spelled; every backend derives its piece from it."""

    kind = "dilated_window"
    elastic_params = frozenset({"window"})

    def index_keep(self, params, i, j, d, ops):
        return (ops.abs(d) < ops.size(params["window"])) & (d % 2 == 0)


@pytest.fixture(autouse=True, scope="module")
def ninth_family():
    register(DilatedWindow)
    yield
    unregister(DilatedWindow.kind)


# One instance per family (parameters chosen so every mask is neither empty nor full).
PARAMS = {
    "dense": {},
    "skip": {},
    "window": {"window": [3, 0.05]},
    "sink_window": {"sink": [2, 0], "window": [4, 0]},
    "vertical_stripe": {"columns": [0, 5, 19, 70], "window": [2, 0]},
    "multi_diagonal": {"period": [6, 0], "width": [2, 0], "count": 2},
    "block_topk": {"block": 8, "grid": [5, 7], "blocks": [[1, 0], [3, 5], [4, 6], [0, 2]]},
    "dilated_window": {"window": [9, 0]},
}
DYNAMIC = {"vertical_slash": {"vertical": [3, 0], "slash": [4, 0], "queries": 8},
           "dynamic_blocks": {"block": 8, "samples": 3, "share": 0.8, "density": [0.5, 64, 0.5]}}
SHAPES = [(37, 53), (53, 37), (41, 41)]         # n_q != n_k both ways, and a length off the block


def static_kinds() -> list[str]:
    return [kind for kind in PARAMS if not get_pattern(kind).dynamic]


def test_every_registered_family_is_walked():
    """A family added to the library must be added here (its parameters), or this fails."""
    assert set(pattern_kinds()) == set(PARAMS) | set(DYNAMIC)


def _attention(q, k, v, keep, scale):
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale
    probs = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1).nan_to_num(0.0)
    return probs @ v.double()


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n_q, n_k", SHAPES)
@pytest.mark.parametrize("kind", list(PARAMS))
def test_reference_mask_layout_and_flex(kind, n_q, n_k, causal):
    family, params = get_pattern(kind), PARAMS[kind]
    mask = family.mask(params, n_q, n_k, causal)
    assert mask.shape == (n_q, n_k)
    if not family.computes_none:            # every family but skip keeps the diagonal
        rows = torch.arange(max(0, n_q - n_k), n_q)
        assert mask[rows, rows + (n_k - n_q)].all()
    if causal:
        assert torch.equal(mask, family.mask(params, n_q, n_k, False) & mask)
    # Block layout: every kept pair in a kept block; a full block keeps every pair.
    block_m, block_n = 16, 8
    any_kept, all_kept = family.block_classes(params, n_q, n_k, causal, block_m, block_n)
    padded = torch.zeros(any_kept.shape[0] * block_m, any_kept.shape[1] * block_n, dtype=torch.bool)
    padded[:n_q, :n_k] = mask
    tiles = padded.view(any_kept.shape[0], block_m, any_kept.shape[1], block_n)
    assert torch.equal(any_kept, tiles.any(3).any(1))
    kept_in_full = tiles.permute(0, 2, 1, 3)[all_kept]
    for tile, (qb, kb) in zip(kept_in_full, all_kept.nonzero().tolist()):
        rows = min(block_m, n_q - qb * block_m)
        assert tile[:rows].all()
    # FlexAttention: the mask_mod on the index grid.
    flex = create_mask(family.mask_mod(params, n_q, n_k, causal), None, None, n_q, n_k, device="cpu")
    assert torch.equal(flex[0, 0], mask)


@pytest.mark.parametrize("kind", list(PARAMS))
def test_flex_mask_mod_traces_without_graph_breaks(kind):
    """FlexAttention compiles a mask_mod with dynamo; a break (numpy in block_topk's layout
    once) makes it run eagerly, 50-150x slower on the H200 (docs/benchmarks.md)."""
    n = 300
    mask_mod = get_pattern(kind).mask_mod(PARAMS[kind], n, n, True)
    index = torch.arange(n)
    explained = torch._dynamo.explain(mask_mod)(torch.tensor(0), torch.tensor(0), index[:, None], index[None, :])
    assert explained.graph_break_count == 0, explained.break_reasons


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n_q, n_k", SHAPES)
@pytest.mark.parametrize("kind", list(PARAMS))
def test_native_window_is_the_reference_mask(kind, n_q, n_k, causal):
    """Where a family claims a native window (FA4's ``window_size``), its reference mask is
    exactly that band; ``window`` claims one (at an elastic width), so the test can fail."""
    family, params = get_pattern(kind), PARAMS[kind]
    width = family.native_window(params, n_k)
    assert (width is not None) == (kind == "window")
    if width is None:
        return
    d = offsets(torch.arange(n_q), torch.arange(n_k), n_q, n_k)
    band = (d < width) & ((d >= 0) if causal else (d > -width))
    assert torch.equal(family.mask(params, n_q, n_k, causal), band)


@pytest.mark.parametrize("n_q, n_k", SHAPES)
@pytest.mark.parametrize("kind", list(PARAMS))
def test_onnx_decomposition_matches_reference_mask(kind, n_q, n_k):
    """The decomposition's mask (before the causal cut, which it adds generically)."""
    if get_pattern(kind).computes_all or get_pattern(kind).computes_none:
        pytest.skip("dense and skip decompose without a mask")
    q, k = np.zeros((1, 1, n_q, 4), np.float32), np.zeros((1, 1, n_k, 4), np.float32)
    keep = decompose._static_keep(HeadGroup(kind, PARAMS[kind], [0]), decompose._Positions(q, k))
    expected = get_pattern(kind).mask(PARAMS[kind], n_q, n_k, causal=False).numpy()
    np.testing.assert_array_equal(np.asarray(keep.value), expected)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kind", [*PARAMS, *DYNAMIC])
def test_cpu_block_sparse_runtime_matches_reference(kind, causal):
    n_q, n_k = (41, 41) if causal else (37, 53)      # the op serves causal at equal lengths
    generator = torch.Generator().manual_seed(len(kind))
    q = torch.randn(2, 4, n_q, 16, generator=generator)
    k, v = (torch.randn(2, 2, n_k, 16, generator=generator) for _ in range(2))
    params = DYNAMIC.get(kind) or PARAMS[kind]
    groups = [HeadGroup(kind, params, [0, 1, 3]), HeadGroup("window", {"window": [5, 0]}, [2])]
    out = cpu_attention.sparse_attention(q, k, v, None, 0.3, causal, groups, rows=8, workers=1)
    expected = reference.sparse_attention(q, k, v, None, 0.3, causal, groups)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    family = get_pattern(kind)
    if not (family.dynamic or family.computes_all):
        # and both against attention under the reference mask itself (GQA: K/V head h // 2)
        keep = family.mask(params, n_q, n_k, causal)
        heads = torch.tensor([0, 1, 3])
        direct = _attention(q[:, heads], k[:, heads // 2], v[:, heads // 2], keep, 0.3)
        torch.testing.assert_close(out[:, heads].double(), direct, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", DYNAMIC)
@pytest.mark.parametrize("causal", [True, False])
def test_dynamic_backends_given_one_estimate(kind, causal):
    """A dynamic family: Flex mask_mod, the Triton tables (every kept pair inside a listed
    block or a gathered column, full blocks wholly kept) and the ONNX estimate, each against
    ``dynamic_mask`` of the same estimate."""
    family, params = get_pattern(kind), DYNAMIC[kind]
    n_q, n_k = (41, 41) if causal else (37, 53)
    generator = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 2, n_q, 8, generator=generator), torch.randn(1, 2, n_k, 8, generator=generator)
    estimate = family.estimate_indices(params, q, k, 0.5, causal)
    mask = family.dynamic_mask(*estimate, n_q, n_k, causal)
    assert 0 < mask.sum() < mask.numel() * (0.6 if causal else 1)
    # One chunk's rows (the reference's and the CPU path's query chunks) are the same rows.
    rows = torch.tensor([0, 5, 17, n_q - 1])
    assert torch.equal(family.dynamic_mask(*estimate, n_q, n_k, causal, rows=rows), mask[..., rows, :])
    flex = create_mask(family.dynamic_mask_mod(*estimate, n_q, n_k, causal), 1, 2, n_q, n_k, device="cpu")
    assert torch.equal(flex, mask)
    tables = backend_piece("triton_tables", kind)(*estimate, n_q, n_k, causal, 16, 8)
    for b, h, qb in np.ndindex(1, 2, -(-n_q // 16)):
        rows = mask[b, h, qb * 16:(qb + 1) * 16]
        covered = torch.zeros(n_k, dtype=torch.bool)
        for position, block in enumerate(tables.lut[b, h, qb, : tables.counts[b, h, qb, 1]].tolist()):
            covered[block * 8:(block + 1) * 8] = True
            if position < tables.counts[b, h, qb, 0]:
                assert rows[:, block * 8:(block + 1) * 8].all(), "a full block with a pair not kept"
        if tables.counts[b, h, qb, 2]:                          # gathered columns (vertical_slash)
            covered[tables.columns[b, h, qb, : tables.counts[b, h, qb, 2]].long()] = True
        assert not (rows & ~covered).any(), "a kept pair outside every listed block and column"
    pos = decompose._Positions(q.numpy(), k.numpy())
    onnx_keep = backend_piece("onnx", kind)(params, q.numpy(), k.numpy(), 0.5, causal, pos)
    np.testing.assert_array_equal(np.asarray(onnx_keep.value), mask.numpy())

# -- Triton, interpreted (a spawned worker: TRITON_INTERPRET must be set before Triton loads) --

@pytest.fixture(scope="module")
def interpreter():
    with interpreter_worker() as (pool, _):
        yield pool


def _interpreted(case):
    """In the worker: the test's own family registers there too; (kernel output, reference)."""
    from sparsec.runtime import kernels

    register(DilatedWindow)
    out = torch.full(case[0].shape, float("nan"))
    kernels.sparse_attention(*case, out=out, autotune=False)
    return out, reference.sparse_attention(*case)


@pytest.mark.parametrize("kind", [*(kind for kind in PARAMS if kind not in ("dense", "skip")), *DYNAMIC])
def test_triton_interpreted_matches_reference(interpreter, kind):
    causal = kind in ("window", "block_topk", "dilated_window", "dynamic_blocks")
    n_q, n_k = (45, 45) if causal else (37, 53)
    generator = torch.Generator().manual_seed(11)
    q = torch.randn(1, 4, n_q, 16, generator=generator)
    k, v = (torch.randn(1, 2, n_k, 16, generator=generator) for _ in range(2))
    params = DYNAMIC.get(kind) or PARAMS[kind]
    groups = [HeadGroup(kind, params, [0, 2, 3]), HeadGroup("dense", {}, [1])]
    out, expected = interpreter.apply(_interpreted, ((q, k, v, None, 0.25, causal, groups),))
    assert not out.isnan().any()
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
