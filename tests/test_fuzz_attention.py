"""Fuzz ``runtime.reference.sparse_attention`` against an independent float64 oracle:
random batch, GQA ratio, head dim, dtype, n_q != n_k (non-causal;
causal attention here needs n_q == n_k), user masks (boolean key padding, additive,
per-head) and pattern parameters of every family. The oracle builds each head's mask from
the family's own ``Pattern.mask`` (vertical_slash: ``estimate_indices`` + ``dynamic_mask``)
and computes masked softmax attention in float64, one head at a time.

Bounded: a few dozen small examples per test, no deadline. The Triton kernels are held to
the same oracle (``sparsec.testing.oracle``) on random cases under the CPU interpreter in
tests/test_triton_kernels.py (seconds per call there, so fewer cases).
"""
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sparsec.patterns import get_pattern
from sparsec.ir.plan import HeadGroup
from sparsec.ir.reference import sparse_attention
from sparsec.testing.oracle import float64_attention

STATIC = ("window", "sink_window", "vertical_stripe", "multi_diagonal", "block_topk")
FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# -- strategies ----------------------------------------------------------------------------------

@st.composite
def pattern_params(draw, kind: str, n_k: int):
    size = st.integers(1, max(1, n_k + 2))
    if kind == "dense":
        return {}
    if kind == "window":
        return {"window": [draw(size), 0]}
    if kind == "sink_window":
        return {"sink": [draw(st.integers(1, 4)), 0], "window": [draw(size), 0]}
    if kind == "vertical_stripe":
        columns = draw(st.lists(st.integers(0, n_k + 3), min_size=1, max_size=4, unique=True))
        return {"columns": sorted(columns), "window": [draw(size), 0]}
    if kind == "multi_diagonal":
        period = draw(st.integers(1, 8))
        return {"period": [period, 0], "width": [draw(st.integers(1, period + 2)), 0],
                "count": draw(st.integers(0, 3))}
    if kind == "block_topk":
        grid_q, grid_k = draw(st.integers(1, 4)), draw(st.integers(1, 4))
        cells = [[i, j] for i in range(grid_q) for j in range(grid_k)]
        blocks = draw(st.lists(st.sampled_from(cells), max_size=len(cells), unique_by=tuple))
        return {"block": draw(st.sampled_from([2, 4, 8])), "grid": [grid_q, grid_k], "blocks": blocks}
    if kind == "vertical_slash":
        return {"vertical": [draw(st.integers(1, n_k + 2)), 0], "slash": [draw(st.integers(1, 2 * n_k + 2)), 0],
                "queries": draw(st.integers(1, 12))}
    raise AssertionError(kind)


@st.composite
def user_mask(draw, batch: int, heads: int, n_q: int, n_k: int):
    """None, or a mask under which key 0 stays attended for every query (so no row of a
    dense head is fully masked): key padding (bool), additive scores, or per-head."""
    kind = draw(st.sampled_from(["none", "padding", "additive", "per_head", "two_d"]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    if kind == "none":
        return None
    if kind == "padding":
        lengths = draw(st.lists(st.integers(1, n_k), min_size=batch, max_size=batch))
        return (torch.arange(n_k)[None, :] < torch.tensor(lengths)[:, None])[:, None, None, :]
    shape = {"additive": (batch, 1, n_q, n_k), "per_head": (1, heads, n_q, n_k), "two_d": (n_q, n_k)}[kind]
    mask = torch.randn(shape, generator=generator)
    removed = torch.rand(shape, generator=generator) < 0.3
    removed[..., 0] = False
    return mask.masked_fill(removed, float("-inf"))


@st.composite
def attention_case(draw, kinds):
    batch = draw(st.integers(1, 2))
    kv_heads, per_kv = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    heads = kv_heads * per_kv
    head_dim = draw(st.sampled_from([4, 8, 16]))
    n_k = draw(st.integers(1, 40))
    causal = draw(st.booleans())
    n_q = n_k if causal else draw(st.one_of(st.just(n_k), st.integers(1, 40)))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    # a partition of the heads into groups, each with its own family and parameters
    assignment = draw(st.lists(st.integers(0, 2), min_size=heads, max_size=heads))
    groups = []
    for index in sorted(set(assignment)):
        kind = draw(st.sampled_from(kinds))
        members = [h for h, a in enumerate(assignment) if a == index]
        groups.append(HeadGroup(kind, draw(pattern_params(kind, n_k)), members))
    seed = draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, n_q, head_dim, generator=generator).to(dtype)
    k = torch.randn(batch, kv_heads, n_k, head_dim, generator=generator).to(dtype)
    v = torch.randn(batch, kv_heads, n_k, head_dim, generator=generator).to(dtype)
    mask = draw(user_mask(batch, heads, n_q, n_k))
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(dtype)
    return q, k, v, mask, head_dim ** -0.5, causal, groups


# -- the oracle ----------------------------------------------------------------------------------

def _multi_diagonal_as_documented(params: dict, n_q: int, n_k: int, causal: bool) -> torch.Tensor:
    """The MultiDiagonal docstring, spelled out independently: offsets within ``width`` of a
    kept diagonal ``m * period`` (``|m| < count``, every ``m`` when ``count`` is 0)."""
    period, width = (max(1, round(params[name][0] + params[name][1] * n_k)) for name in ("period", "width"))
    d = torch.arange(n_q)[:, None] + (n_k - n_q) - torch.arange(n_k)[None, :]
    count = int(params.get("count", 0))
    reach = count - 1 if count > 0 else (n_q + n_k) // period + 1
    keep = torch.zeros(n_q, n_k, dtype=torch.bool)
    for m in range(-reach, reach + 1):
        keep |= (d - m * period).abs() < width
    return keep & (d >= 0) if causal else keep


def _check_documented_masks(q, k, causal, groups) -> None:
    """Every static pattern keeps the main diagonal (so no row is empty where it exists);
    multi_diagonal keeps what its docstring says."""
    n_q, n_k = q.shape[2], k.shape[2]
    d = torch.arange(n_q)[:, None] + (n_k - n_q) - torch.arange(n_k)[None, :]
    for group in groups:
        if group.pattern not in STATIC:
            continue
        mask = get_pattern(group.pattern).mask(group.params, n_q, n_k, causal)
        assert mask[d == 0].all(), group
        if group.pattern == "multi_diagonal":
            assert torch.equal(mask, _multi_diagonal_as_documented(group.params, n_q, n_k, causal)), group


def _check(case) -> None:
    q, k, v, mask, scale, causal, groups = case
    _check_documented_masks(q, k, causal, groups)
    got = sparse_attention(q, k, v, mask, scale, causal, groups)
    assert got.dtype == q.dtype and got.shape == q.shape[:-1] + (v.shape[-1],)
    expected = float64_attention(q, k, v, mask, scale, causal, groups)
    tolerance = {"rtol": 1e-4, "atol": 1e-5} if q.dtype == torch.float32 else {"rtol": 3e-2, "atol": 3e-2}
    torch.testing.assert_close(got.double(), expected, **tolerance)


# -- the tests -----------------------------------------------------------------------------------

@FUZZ
@given(attention_case(STATIC + ("dense",)))
def test_static_families_match_the_float64_oracle(case):
    _check(case)


def _cross_attention_case():
    """n_q = 4 > n_k = 3 with 64 estimating queries: the estimate saw offsets below -(n_k - 1)."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 8, generator=generator) for n in (4, 3, 3))
    params = {"vertical": [1, 0], "slash": [2, 0], "queries": 64}
    return q, k, v, None, 8 ** -0.5, False, [HeadGroup("vertical_slash", params, [0, 1])]


@FUZZ
@given(attention_case(("vertical_slash", "window")))
@example(_cross_attention_case())
def test_vertical_slash_matches_the_float64_oracle(case):
    _check(case)
