"""FlashAttention-4 backend (runtime/fa4.py): block tables and the mask_mod arithmetic on CPU
against each family's reference mask; the kernel itself against the reference on a GPU."""
from __future__ import annotations

import math

import pytest
import torch

from sparsec.patterns import get_pattern
from sparsec.plan import HeadGroup
from sparsec.runtime import fa4, reference

CASES = {
    "dense": {},
    "skip": {},
    "window": {"window": [37, 0]},
    "sink_window": {"sink": [4, 0], "window": [50, 0]},
    "multi_diagonal": {"period": [40, 0], "width": [5, 0], "count": 3},
    "multi_diagonal_all": {"period": [24, 0.01], "width": [3, 0], "count": 0},
    "vertical_stripe": {"columns": [0, 1, 77, 300, 5000], "window": [20, 0]},
    "block_topk": {"block": 64, "grid": [4, 4], "blocks": [[1, 0], [3, 1], [2, 2], [0, 3]]},
}
SHAPES = [(300, 300, True), (300, 300, False), (200, 333, False), (333, 333, True)]


def _kind(case: str) -> str:
    return case.removesuffix("_all")


def _tile_truth(mask: torch.Tensor, block_m: int, block_n: int):
    """(any kept, every pair kept and in range) per tile, straight from the token mask."""
    n_q, n_k = mask.shape
    rows, cols = math.ceil(n_q / block_m), math.ceil(n_k / block_n)
    padded = torch.zeros(rows * block_m, cols * block_n, dtype=torch.bool)
    padded[:n_q, :n_k] = mask
    tiles = padded.view(rows, block_m, cols, block_n)
    some = tiles.any(3).any(1)
    padded[n_q:] = True
    return some, tiles.all(3).all(1)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("n_q,n_k,causal", SHAPES)
@pytest.mark.parametrize("block_n", [128, 80])
def test_tables_and_mask_mod_match_the_reference(case, n_q, n_k, causal, block_n):
    kind, params = _kind(case), CASES[case]
    heads = [1, 3, 4]                                   # not every head: per-head tables
    tables = fa4.build_tables([HeadGroup(kind, params, heads)], 6, n_q, n_k, causal, block_n, torch.device("cpu"))
    expected = get_pattern(kind).mask(params, n_q, n_k, causal)
    some, every = _tile_truth(expected, fa4.BLOCK_M, block_n)
    full_tokens = every.repeat_interleave(fa4.BLOCK_M, 0).repeat_interleave(block_n, 1)[:n_q, :n_k]
    partial_tokens = (some & ~every).repeat_interleave(fa4.BLOCK_M, 0).repeat_interleave(block_n, 1)[:n_q, :n_k]
    for head in heads:
        assert torch.equal(fa4.torch_mask(tables, head, n_q, n_k, causal), expected), head
        assert torch.equal(fa4.tables_mask(tables, head, n_q, n_k, full=True), full_tokens)
        assert torch.equal(fa4.tables_mask(tables, head, n_q, n_k, full=False), partial_tokens)
    for head in (0, 2, 5):                              # heads of no group keep nothing here
        assert not fa4.tables_mask(tables, head, n_q, n_k, full=True).any()
        assert not fa4.tables_mask(tables, head, n_q, n_k, full=False).any()


def test_mixed_site_one_table_per_head():
    """Four groups of one site (GQA 8:2 heads, interleaved) in one set of tables: each head
    follows its own group's mask; one group over every head broadcasts its tables."""
    n_q = n_k = 419
    groups = [HeadGroup("window", CASES["window"], [0, 5]), HeadGroup("sink_window", CASES["sink_window"], [1, 2]),
              HeadGroup("block_topk", CASES["block_topk"], [3, 7]), HeadGroup("vertical_stripe",
                                                                              CASES["vertical_stripe"], [4, 6])]
    tables = fa4.build_tables(groups, 8, n_q, n_k, True, 128, torch.device("cpu"))
    assert tables.partial_count.shape == (1, 8, 4) and tables.has_stripes and tables.has_layout
    for group in groups:
        expected = get_pattern(group.pattern).mask(group.params, n_q, n_k, True)
        for head in group.heads:
            assert torch.equal(fa4.torch_mask(tables, head, n_q, n_k, True), expected)
            listed = fa4.tables_mask(tables, head, n_q, n_k, True) | fa4.tables_mask(tables, head, n_q, n_k, False)
            assert not (expected & ~listed).any()
    shared = fa4.build_tables([HeadGroup("window", CASES["window"], list(range(8)))], 8, n_q, n_k, True, 128,
                              torch.device("cpu"))
    assert shared.partial_count.shape[1] == 1 and shared.full_index.shape[1] == 1


def test_every_static_family_has_fa4_terms():
    from sparsec.patterns import pattern_kinds
    static = {kind for kind in pattern_kinds() if not get_pattern(kind).dynamic}
    assert all(fa4.family_terms(kind) is not None for kind in static)
    assert fa4.family_terms("vertical_slash") is None


def test_backend_rule():
    from sparsec.cost_model import attention_backend
    assert attention_backend("sm90", "window", 128) == "fa4"
    assert attention_backend("sm90", "vertical_slash", 128) == "triton"
    assert attention_backend("sm90", "block_topk", 128) == "triton"
    assert attention_backend("sm80", "window", 128) == "triton"
    assert attention_backend("sm90", "window", 96) == "triton"


# -- GPU: the kernel against the reference ----------------------------------------------------

def _fa4_device() -> bool:
    return torch.cuda.is_available() and fa4.available(torch.device("cuda"))


gpu = pytest.mark.gpu
needs_fa4 = pytest.mark.skipif(not _fa4_device(), reason="needs an sm90+ GPU with flash-attn-4 installed")


def _check(groups, heads, kv_heads, n, head_dim, dtype, causal):
    from sparsec.runtime import kernels
    torch.manual_seed(0)
    q = torch.randn(1, heads, n, head_dim, device="cuda", dtype=dtype)
    k = torch.randn(1, kv_heads, n, head_dim, device="cuda", dtype=dtype)
    v = torch.randn(1, kv_heads, n, head_dim, device="cuda", dtype=dtype)
    scale = head_dim ** -0.5
    launches, rest = fa4.site_launches(q, k, v, None, scale, causal, groups)
    out = kernels.sparse_attention(q, k, v, None, scale, causal, groups)
    expected = reference.sparse_attention(q.float(), k.float(), v.float(), None, scale, causal, groups)
    error = (out.float() - expected).norm() / expected.norm().clamp_min(1e-6)
    assert error < 2e-2, float(error)
    return launches, rest


@gpu
@needs_fa4
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [True, False])
def test_fa4_family_matches_reference(case, head_dim, dtype, causal):
    from sparsec.cost_model import attention_backend
    groups = [HeadGroup(_kind(case), CASES[case], [0, 1, 2, 3, 4, 5, 6, 7])]
    launches, rest = _check(groups, 8, 2, 1000, head_dim, dtype, causal)
    served = attention_backend("sm90", groups[0].pattern, head_dim) == "fa4"
    assert (len(launches), len(rest)) == ((1, 0) if served else (0, 1))


@gpu
@needs_fa4
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_fa4_mixed_site_gqa(head_dim):
    """Mixed groups in one launch (per-head tables), GQA 8:2, vertical_slash left to Triton.
    At head dim 256 FA4's key tile is 80: the tables follow it, or the site falls back."""
    groups = [HeadGroup("window", CASES["window"], [0, 5]), HeadGroup("sink_window", CASES["sink_window"], [1, 2]),
              HeadGroup("multi_diagonal", CASES["multi_diagonal"], [3]), HeadGroup("dense", {}, [7]),
              HeadGroup("vertical_slash", {"vertical": [64, 0], "slash": [64, 0], "last_q": 64}, [4, 6])]
    launches, rest = _check(groups, 8, 2, 777, head_dim, torch.bfloat16, True)
    assert [g.pattern for g in rest] == (["vertical_slash"] if launches else [g.pattern for g in groups])
