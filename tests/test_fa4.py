"""FlashAttention-4 backend (runtime/fa4.py): block tables and the mask_mod arithmetic on CPU
against each family's reference mask; the kernel itself against the reference on a GPU."""
from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch

from sparsec.patterns import get_pattern
from sparsec.ir.plan import HeadGroup
from sparsec.runtime import fa4
from sparsec.ir import reference

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
        assert torch.equal(fa4.kernel_mask(tables, head, n_q, n_k, causal), expected), head
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
    assert tables.partial_count.shape == (1, 8, 4) and tables.form.stripes and tables.form.layout
    for group in groups:
        expected = get_pattern(group.pattern).mask(group.params, n_q, n_k, True)
        for head in group.heads:
            assert torch.equal(fa4.kernel_mask(tables, head, n_q, n_k, True), expected)
            listed = fa4.tables_mask(tables, head, n_q, n_k, True) | fa4.tables_mask(tables, head, n_q, n_k, False)
            assert not (expected & ~listed).any()
    shared = fa4.build_tables([HeadGroup("window", CASES["window"], list(range(8)))], 8, n_q, n_k, True, 128,
                              torch.device("cpu"))
    assert shared.partial_count.shape[1] == 1 and shared.full_index.shape[1] == 1
    # Without a multi_diagonal head the kernel's mask leaves the diagonal bands out.
    assert not tables.form.diagonals and not shared.form.diagonals
    banded = [*groups, HeadGroup("multi_diagonal", CASES["multi_diagonal"], [5])]
    banded[0] = HeadGroup("window", CASES["window"], [0])
    with_bands = fa4.build_tables(banded, 8, n_q, n_k, True, 128, torch.device("cpu"))
    assert with_bands.form.diagonals
    for group in banded:
        expected = get_pattern(group.pattern).mask(group.params, n_q, n_k, True)
        for head in group.heads:
            assert torch.equal(fa4.kernel_mask(with_bands, head, n_q, n_k, True), expected)


@pytest.mark.parametrize("n_q,n_k,causal", [(1024, 1024, True), (1000, 1000, True), (896, 1024, False),
                                             (900, 1000, True)])
def test_a_layout_on_the_block_grid_is_carried_by_the_tables_alone(n_q, n_k, causal):
    """block_topk cells of 256 tokens hold whole 128-blocks: the kernel's mask_mod reads no
    layout (partial blocks are cut by causality alone), and the kernel still keeps exactly
    the pattern, at a length off the block grid and with n_q != n_k. Cells of 200 tokens,
    or diagonal cells shifted by n_k - n_q = 100, split blocks: the layout stays a lookup."""
    aligned = {"block": 256, "grid": [4, 4], "blocks": [[1, 0], [3, 1], [2, 2], [3, 0]]}
    for params, on_grid in ((aligned, (n_k - n_q) % 128 == 0), ({**aligned, "block": 200, "grid": [5, 5]}, False)):
        groups = [HeadGroup("block_topk", params, [0, 2]), HeadGroup("window", CASES["window"], [1, 3])]
        tables = fa4.build_tables(groups, 4, n_q, n_k, causal, 128, torch.device("cpu"))
        assert tables.form.layout is not on_grid
        alone = fa4.build_tables(groups[:1], 4, n_q, n_k, causal, 128, torch.device("cpu"))
        # Alone on the grid the layout needs no term at all: partial blocks are cut by causality.
        assert (alone.form.band or alone.form.layout) is not on_grid
        for site in (tables, alone):
            for group in groups[: 2 if site is tables else 1]:
                expected = get_pattern(group.pattern).mask(group.params, n_q, n_k, causal)
                for head in group.heads:
                    assert torch.equal(fa4.kernel_mask(site, head, n_q, n_k, causal), expected), (params, head)


@pytest.mark.parametrize("n_q,n_k", [(300, 300), (200, 333)])
def test_values_every_served_head_shares_at_every_length_are_compiled_in(n_q, n_k):
    """A window and sink that do not change with the length and that every served head shares
    become literals of the kernel (MaskForm.fixed), and the kernel still keeps each head's
    pattern; an elastic window, two different windows, or an offset n_k - n_q that grows with
    the length stay table reads (a kernel per length otherwise)."""
    def fixed(groups):
        tables = fa4.build_tables(groups, 6, n_q, n_k, True, 128, torch.device("cpu"))
        for group in groups:
            expected = get_pattern(group.pattern).mask(group.params, n_q, n_k, True)
            for head in group.heads:
                assert torch.equal(fa4.kernel_mask(tables, head, n_q, n_k, True), expected), (group, head)
        return dict(tables.form.fixed)

    sink_window = CASES["sink_window"]
    one = fixed([HeadGroup("sink_window", sink_window, [1, 3, 4])])
    assert one[fa4.WINDOW] == 50 and one[fa4.SINK] == 4
    assert (fa4.OFFSET in one) is (n_q == n_k)
    elastic = fixed([HeadGroup("sink_window", {**sink_window, "window": [50, 0.05]}, [1, 3, 4])])
    assert fa4.WINDOW not in elastic and elastic[fa4.SINK] == 4
    two = fixed([HeadGroup("sink_window", sink_window, [1, 3]), HeadGroup("window", CASES["window"], [4])])
    assert fa4.WINDOW not in two and fa4.SINK not in two


def test_a_mask_of_literals_alone_is_computed_without_aux_tensors():
    """Where every value a site's mask uses is compiled in, FA4 is called without aux tensors
    (passing them cost sink_window 4 % on the H200, GQA 32:8: 0.457 / 1.851 ms at 16k / 64k
    with them, 0.438 / 1.775 without) and the mask made without them is the family's."""
    n = 300
    heads = [0, 1, 2]
    literal = fa4.build_tables([HeadGroup("sink_window", CASES["sink_window"], heads)], 3, n, n, True, 128,
                               torch.device("cpu"))
    elastic = fa4.build_tables([HeadGroup("sink_window", {**CASES["sink_window"], "window": [50, 0.05]}, heads)],
                               3, n, n, True, 128, torch.device("cpu"))
    assert not literal.form.reads_tables and elastic.form.reads_tables
    kept = fa4.site_keeps(1, torch.arange(n)[:, None], torch.arange(n)[None, :], None, literal.form,
                          element=lambda index: index, const=lambda value: value)
    assert torch.equal(kept, get_pattern("sink_window").mask(CASES["sink_window"], n, n, True))


def _mixed_site(n_q, n_k, causal, block_n):
    """Every lookup kind in one site (GQA 8:2, interleaved): heads with stripes, with a layout,
    with neither (they still read both lookups), and a head in no group."""
    groups = [HeadGroup("window", CASES["window"], [0, 5]), HeadGroup("sink_window", CASES["sink_window"], [1]),
              HeadGroup("block_topk", CASES["block_topk"], [3, 7]),
              HeadGroup("vertical_stripe", CASES["vertical_stripe"], [4, 6])]
    return groups, fa4.build_tables(groups, 8, n_q, n_k, causal, block_n, torch.device("cpu"))


def _reference_mask(groups, head, n_q, n_k, causal):
    """The family's own mask for ``head`` (nothing for a head in no group)."""
    for group in groups:
        if head in group.heads:
            return get_pattern(group.pattern).mask(group.params, n_q, n_k, causal)
    return torch.zeros(n_q, n_k, dtype=torch.bool)


@pytest.mark.parametrize("n_q,n_k,causal", SHAPES)
@pytest.mark.parametrize("block_n", [128, 80])
def test_lookups_cover_every_index_the_kernel_evaluates(n_q, n_k, causal, block_n):
    """FA4 runs the mask_mod on whole tiles, padded rows and keys included (wrapped into range
    only in a row's first block), for every head of the site: each read stays inside its
    table (torch indexing is bounds-checked), and the in-range part is the family's mask."""
    groups, tables = _mixed_site(n_q, n_k, causal, block_n)
    rows, keys = math.ceil(n_q / fa4.BLOCK_M) * fa4.BLOCK_M, math.ceil(n_k / block_n) * block_n
    q, k = torch.arange(rows)[:, None], torch.arange(keys)[None, :]
    for head in range(8):
        kept = fa4.site_keeps(head, q, k, tables.aux_tensors, tables.form, element=lambda index: index,
                              const=lambda value: value)
        assert kept.shape == (rows, keys)
        assert torch.equal(kept[:n_q, :n_k], _reference_mask(groups, head, n_q, n_k, causal)), head


def test_per_element_calls_match_the_reference():
    """The kernel's calling convention (mask.py apply_mask): one mask_mod call per score with
    one-element index values (``scalar_to_ssa``), the head as ``head[0]``, table reads lifted
    back to one-element values; causal, so a lookup past the diagonal must be cut."""
    n_q, n_k, causal = 333, 333, True
    groups, tables = _mixed_site(n_q, n_k, causal, 128)
    shared_groups = [HeadGroup("vertical_stripe", CASES["vertical_stripe"], list(range(8)))]
    shared = fa4.build_tables(shared_groups, 8, n_q, n_k, causal, 128, torch.device("cpu"))
    torch.manual_seed(0)
    pairs = torch.cat([torch.randint(0, n_q, (300, 2)), torch.tensor([[0, 1], [0, 77], [5, 300], [70, 77], [10, 60]])])
    for head, (groups, tables) in itertools.product(range(8), [(groups, tables), (shared_groups, shared)]):
        expected = _reference_mask(groups, head, n_q, n_k, causal)
        for query, key in pairs.tolist():
            kept = fa4.site_keeps(torch.tensor([head])[0], torch.tensor([query]), torch.tensor([key]),
                                  tables.aux_tensors, tables.form, element=lambda index: index[0],
                                  const=lambda value: torch.as_tensor(value).reshape(1))
            assert kept.shape == (1,) and bool(kept[0]) == bool(expected[query, key]), (head, query, key)


@pytest.mark.parametrize("case", list(CASES))
def test_aux_tensors_are_what_fa4_takes(case):
    """int32 and contiguous, each with one stride-1 dim among those longer than one (FA4's
    ``cute_dsl_utils._resolve_aux_leading_dim``; ``mark_layout_dynamic`` refuses others)."""
    tables = fa4.build_tables([HeadGroup(_kind(case), CASES[case], [1, 3, 4])], 6, 200, 333, True, 80,
                              torch.device("cpu"))
    for tensor in tables.aux_tensors:
        assert tensor.dtype == torch.int32 and tensor.is_contiguous()
        unit = [dim for dim, stride in enumerate(tensor.stride()) if stride == 1]
        assert len(unit) == 1 or len([dim for dim in unit if tensor.shape[dim] > 1]) == 1, tensor.shape


def test_every_static_family_has_fa4_terms():
    from sparsec.patterns import pattern_kinds
    static = {kind for kind in pattern_kinds() if not get_pattern(kind).dynamic}
    assert all(fa4.family_terms(kind) is not None for kind in static)
    assert fa4.family_terms("vertical_slash") is None


def test_a_site_fa4_cannot_build_falls_back_with_one_warning(monkeypatch):
    """FA4's JIT raises its own errors (flash-attn-4 4.0.0b36 raised a CuTe DSLRuntimeError,
    an internal compiler error, for a mask_mod with aux_scalars): the site's groups go to
    the other kernels, with one warning per reason, never a crash."""
    class DSLRuntimeError(Exception):
        pass

    def refuse(*args):
        raise DSLRuntimeError("ICE: 'llvm.call' op incorrect number of operands")

    monkeypatch.setattr(fa4, "available", lambda device: True)
    monkeypatch.setattr(fa4, "serves", lambda *args: True)
    monkeypatch.setattr(fa4, "site_call", refuse)
    monkeypatch.setattr(fa4, "_WARNED", set())
    q = k = v = torch.randn(1, 2, 40, 16)
    groups = [HeadGroup("window", CASES["window"], [0, 1])]
    with pytest.warns(UserWarning, match="DSLRuntimeError"):
        assert fa4.site_launches(q, k, v, None, 0.25, True, groups) == ([], groups)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fa4.site_launches(q, k, v, None, 0.25, True, groups) == ([], groups)


def test_a_short_host_bound_site_stays_on_triton_as_a_whole(monkeypatch):
    """FA4's call costs more host time than a Triton site's (82 us more on the H200): where the
    host bounds the site (SmolLM2's heads at 1k, head dim 128) the site runs Triton for every
    group, priced so, and the op follows; at 32k the GPU time decides and FA4 serves it."""
    from sparsec.analysis.cost_model import CostModel
    from sparsec.ir.targets import running_for

    monkeypatch.setenv("SPARSEC_FA4", "1")
    cost = CostModel("h200")
    groups = [("sink_window", {"sink": [1, 0], "window": [256, 0]}, 6), ("dense", {}, 3)]
    assert cost.backend("sink_window", groups[0][1], 1024, True, 128) == "fa4"      # per group, GPU time
    assert not cost.fa4_pays(groups, 1024, True, 128) and cost.fa4_pays(groups, 32768, True, 128)
    triton_only = cost._sparse_site_seconds(groups, 1024, True, 128, 1, fa4=False)[0]
    assert cost.site_seconds(groups, 1024, True, 128) == triton_only < cost._sparse_site_seconds(
        groups, 1024, True, 128, 1, fa4=True)[0]
    monkeypatch.setattr(fa4, "available", lambda device: True)
    monkeypatch.setattr(fa4, "_arch", lambda device: "sm90")
    monkeypatch.setattr(fa4, "site_call", lambda *args: lambda q, k, v, out: None)
    heads = [HeadGroup("sink_window", groups[0][1], [0, 1, 3, 4, 6, 7]), HeadGroup("dense", {}, [2, 5, 8])]
    for n, served in ((1024, False), (32768, True)):
        q = torch.randn(1, 9, n, 128, dtype=torch.bfloat16)
        k = v = torch.randn(1, 3, n, 128, dtype=torch.bfloat16)
        with running_for("h200"):
            launches, rest = fa4.site_launches(q, k, v, None, 128 ** -0.5, True, heads)
        assert (len(launches) == 1) is served and (rest == heads) is not served


def test_backend_rule():
    from sparsec.analysis.cost_model import attention_backend
    assert attention_backend("sm90", "window", 128) == "fa4"
    assert attention_backend("sm90", "vertical_slash", 128) == "triton"
    assert attention_backend("sm90", "block_topk", 128) == "fa4"
    assert attention_backend("sm90", "vertical_stripe", 256) == "fa4"
    assert attention_backend("sm80", "window", 128) == "triton"
    assert attention_backend("sm90", "window", 96) == "triton"


def test_groups_whose_fa4_mask_is_costly_per_score_run_triton():
    """FA4's rates are measured on index-compare masks; a mask that reads a table per score
    (stripe columns, a layout whose cells split FA4's 128 x 128 blocks, or its 128 x 80 blocks
    at head dim 256) or divides (multi_diagonal) ran slower there than on Triton (a mixed 16k
    site: 1.07 ms against 0.62; multi_diagonal 5.36 against 1.26), so the h200 cost model
    keeps those groups on Triton; a layout of whole blocks is carried by the block tables
    alone and may take FA4."""
    from sparsec.analysis.cost_model import CostModel
    model = CostModel("h200")
    whole = {"block": 256, "grid": [4, 4], "blocks": [[1, 0], [3, 1], [2, 2], [0, 3]]}
    split = {**whole, "block": 64}
    assert model.backend("block_topk", whole, 16384, True, 128) == "fa4"
    assert model.backend("block_topk", whole, 16384, True, 256) == "triton"      # 256 % 80 != 0
    assert model.backend("block_topk", split, 16384, True, 128) == "triton"
    assert model.backend("vertical_stripe", CASES["vertical_stripe"], 16384, True, 128) == "triton"
    assert model.backend("multi_diagonal", CASES["multi_diagonal"], 16384, True, 128) == "triton"
    assert model.backend("sink_window", {"sink": [4, 0], "window": [512, 0]}, 16384, True, 128) == "fa4"


@pytest.mark.parametrize("head_dim,n,backend", [(64, 4096, "triton"), (64, 16384, "triton"), (128, 4096, "fa4"),
                                                (128, 16384, "fa4"), (256, 16384, "fa4")])
def test_the_h200_backend_choice_per_head_dim_follows_its_measurements(head_dim, n, backend):
    """sink_window (sink 128, window 512), GQA 32:8, on the H200 (ms, FA4 / Triton): 0.174 /
    0.077 at head dim 64 and 4k, 0.348 / 0.293 at 64 and 16k, 0.115 / 0.124 at 128 and 4k,
    0.438 / 0.483 at 128 and 16k, 0.772 / 1.033 at 256 and 16k. FA4's per-row cost (its
    mask_mod on a row's partial blocks) does not shrink with the head dim; when it was priced
    as if it did, every one of these picked FA4."""
    from sparsec.analysis.cost_model import CostModel
    params = {"sink": [128, 0], "window": [512, 0]}
    assert CostModel("h200").backend("sink_window", params, n, True, head_dim) == backend


# -- GPU: the kernel against the reference ----------------------------------------------------

def _fa4_device() -> bool:
    return torch.cuda.is_available() and fa4.supported(torch.device("cuda"))


gpu = pytest.mark.gpu
needs_fa4 = pytest.mark.skipif(not _fa4_device(), reason="needs an sm90+ GPU with flash-attn-4 installed")


@pytest.fixture(autouse=True)
def _fa4_switched_on(monkeypatch):
    """The backend is off by default (SPARSEC_FA4); these tests are what switches it on."""
    from sparsec.runtime import kernels
    monkeypatch.setattr(fa4, "ENABLED", True)
    kernels.clear_call_plans()          # launches prepared while it was off


@gpu
@needs_fa4
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_the_cost_models_key_block_is_fa4s(head_dim):
    from sparsec.analysis.cost_model import fa4_key_block
    from sparsec.runtime.kernels import device_arch
    device = torch.device("cuda")
    assert fa4.key_block(head_dim, device) == fa4_key_block(device_arch(device), head_dim)


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
    from sparsec.analysis.cost_model import attention_backend
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
              HeadGroup("vertical_slash", {"vertical": [64, 0], "slash": [64, 0], "queries": 64}, [4, 6])]
    launches, rest = _check(groups, 8, 2, 777, head_dim, torch.bfloat16, True)
    assert [g.pattern for g in rest] == (["vertical_slash"] if launches else [g.pattern for g in groups])


LOOKUP_SITES = {                                       # GQA 4:2; per-head tables, or broadcast (pack_gqa)
    "vertical_stripe": [HeadGroup("vertical_stripe", CASES["vertical_stripe"], [1, 2])],
    "vertical_stripe_all": [HeadGroup("vertical_stripe", CASES["vertical_stripe"], [0, 1, 2, 3])],
    "block_topk": [HeadGroup("block_topk", CASES["block_topk"], [1, 2])],
    "block_topk_all": [HeadGroup("block_topk", CASES["block_topk"], [0, 1, 2, 3])],
    # cells of 256 tokens: the tables alone carry the layout (no lookup) at head dim 128
    "block_topk_on_grid": [HeadGroup("block_topk", {"block": 256, "grid": [4, 4],
                                                    "blocks": [[1, 0], [3, 1], [2, 2], [3, 0]]}, [0, 1, 2, 3])],
    "mixed": [HeadGroup("window", CASES["window"], [0]), HeadGroup("vertical_stripe", CASES["vertical_stripe"], [1]),
              HeadGroup("block_topk", CASES["block_topk"], [2, 3])],
}


@gpu
@needs_fa4
@pytest.mark.parametrize("site", list(LOOKUP_SITES))
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("head_dim", [128, 256])
def test_fa4_lookup_families_direct(site, causal, head_dim):
    """The FA4 kernel on the families whose mask_mod reads the stripe and layout tables, called
    directly."""
    groups, n, scale = LOOKUP_SITES[site], 777, head_dim ** -0.5
    torch.manual_seed(0)
    q = torch.randn(1, 4, n, head_dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 2, n, head_dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    out = torch.zeros_like(q)
    fa4.site_call(q, k, v, scale, causal, groups)(q, k, v, out)
    expected = reference.sparse_attention(q.float(), k.float(), v.float(), None, scale, causal, groups)
    for head in sorted(h for group in groups for h in group.heads):
        error = (out[:, head].float() - expected[:, head]).norm() / expected[:, head].norm()
        assert error < 2e-2, (head, float(error))


def _with_slow_fa4_rows(cost):
    """``cost`` with FA4's per-query-row cost as measured on the H200 before its mask_mod
    evaluated only the terms a site uses (0.26 us; 0.045 since): short rows go to Triton."""
    import dataclasses
    cost.profile = dataclasses.replace(cost.profile, fa4=dataclasses.replace(cost.profile.fa4, row_block_us=0.2646))
    return cost


def test_cost_model_picks_fa4_per_group_by_measured_rates_and_prices_one_launch(monkeypatch):
    import dataclasses

    from sparsec.analysis.cost_model import CostModel, head_flops

    monkeypatch.setenv("SPARSEC_FA4", "1")
    cost = _with_slow_fa4_rows(CostModel("h200"))
    small, large = {"window": [256, 0]}, {"window": [8192, 0]}
    # FA4's mask_mod path paying more per query row, Triton more per block: per group.
    assert cost.backend("window", small, 16384, True, 128) == "triton"
    assert cost.backend("window", large, 16384, True, 128) == "fa4"
    assert cost.backend("dense", {}, 16384, True, 128) == "fa4"
    assert cost.backend("vertical_slash", {"vertical": [64, 0], "slash": [64, 0]}, 16384, True, 128) == "triton"
    assert CostModel("cpu").backend("window", small, 16384, True, 128) == "cpu"
    assert CostModel("a100").backend("window", large, 16384, True, 128) == "triton"
    groups = [("window", large, 4), ("sink_window", {"sink": [1, 0], "window": [8192, 0]}, 4)]
    on = cost.site_seconds(groups, 16384, True, 128)
    fa4_rates = cost.profile.fa4
    expected = fa4_rates.launch_us * 1e-6 + sum(
        count * (head_flops(kind, params, 16384, True, 128) / (fa4_rates.tflops * 1e12)
                 + 128 * fa4_rates.row_block_us * 1e-6) for kind, params, count in groups)
    assert on == pytest.approx(expected, rel=1e-6)                 # FA4's rates, one launch for both
    monkeypatch.setenv("SPARSEC_FA4", "0")
    assert cost.backend("window", large, 16384, True, 128) == "triton"
    off = cost.site_seconds(groups, 16384, True, 128)
    work = sum(count * cost.head_seconds(kind, params, 16384, True, 128) for kind, params, count in groups)
    assert off == pytest.approx(work + 2 * cost.profile.sparse.launch_us * 1e-6) and on < off
    no_fa4 = dataclasses.replace(cost.profile, fa4=None)
    monkeypatch.setenv("SPARSEC_FA4", "1")
    cost.profile = no_fa4                                           # unmeasured: Triton
    assert cost.backend("window", large, 16384, True, 128) == "triton"


def test_a_plain_window_over_the_whole_site_is_priced_as_fa4s_native_window(monkeypatch):
    from sparsec.analysis.cost_model import CostModel, head_flops

    monkeypatch.setenv("SPARSEC_FA4", "1")
    cost = _with_slow_fa4_rows(CostModel("h200"))
    window, sink_window = {"window": [512, 0]}, {"sink": [128, 0], "window": [512, 0]}
    # Short rows: FA4's block-sparse path loses to Triton, its native window does not.
    assert cost.backend("window", window, 16384, True, 128) == "triton"
    assert cost.backend("window", window, 16384, True, 128, whole_site=True) == "fa4"
    assert cost.backend("sink_window", sink_window, 16384, True, 128, whole_site=True) == "triton"
    fa4_rates, dense = cost.profile.fa4, cost.profile.dense
    native = fa4_rates.launch_us * 1e-6 + 32 * (head_flops("window", window, 16384, True, 128)
                                                / (fa4_rates.tflops * 1e12) + 128 * dense.row_block_us * 1e-6)
    whole = cost.site_seconds([("window", window, 32)], 16384, True, 128)
    assert whole == pytest.approx(max(native, cost.profile.host.sparse_seconds(1, 0, True)), rel=1e-6)
    # The same window sharing its site with another group runs the block-sparse path (Triton here).
    shared = cost.site_seconds([("window", window, 16), ("sink_window", sink_window, 16)], 16384, True, 128)
    assert shared > whole
    monkeypatch.setattr(fa4, "_arch", lambda device: "sm90")
    q = torch.randn(1, 4, 16384, 128, dtype=torch.bfloat16)
    k = v = torch.randn(1, 2, 16384, 128, dtype=torch.bfloat16)
    group = HeadGroup("window", window, [0, 1, 2, 3])
    from sparsec.analysis import cost_model
    from sparsec.ir.targets import running_for
    original = cost_model.CostModel.backend
    monkeypatch.setattr(cost_model.CostModel, "backend", lambda self, *args, **kwargs: original(cost, *args, **kwargs))
    with running_for("h200"):
        assert fa4.serves(q, k, v, None, True, group, whole_site=True)
        assert not fa4.serves(q, k, v, None, True, group)


def test_the_op_follows_the_running_targets_cost_model(monkeypatch):
    """Under a compiled model's target the op asks its cost model per group and length;
    a direct call keeps the family rule (FA4 for every static group)."""
    from sparsec.ir.targets import running_for

    from sparsec.analysis.cost_model import CostModel
    original = CostModel.backend
    monkeypatch.setenv("SPARSEC_FA4", "1")
    monkeypatch.setattr(fa4, "_arch", lambda device: "sm90")
    q = torch.randn(1, 4, 16384, 128, dtype=torch.bfloat16)
    k = v = torch.randn(1, 2, 16384, 128, dtype=torch.bfloat16)
    small, large = HeadGroup("window", {"window": [256, 0]}, [0, 1]), HeadGroup("window", {"window": [8192, 0]}, [2, 3])
    assert fa4.serves(q, k, v, None, True, small) and fa4.serves(q, k, v, None, True, large)
    from sparsec.analysis import cost_model
    slow_rows = _with_slow_fa4_rows(cost_model.CostModel("h200"))
    monkeypatch.setattr(cost_model.CostModel, "backend", lambda self, *args, **kwargs: original(
        slow_rows if self.target.name == "h200" else self, *args, **kwargs))
    with running_for("h200"):
        assert not fa4.serves(q, k, v, None, True, small)          # short rows: Triton
        assert fa4.serves(q, k, v, None, True, large)              # long rows: FA4
        assert not fa4.serves(q, k, v, torch.ones(1, 1, 1, 16384, dtype=torch.bool), True, large)
    with running_for("h100"):                                      # no FA4 measurements: Triton
        assert not fa4.serves(q, k, v, None, True, large)


# -- compiled for sm90 without a GPU ---------------------------------------------------------

@pytest.fixture
def sm90_without_a_gpu(monkeypatch):
    """FA4's CPU-only compilation (flash_attn/cute/interface.py ``_get_device_arch``): kernel
    path and compilation target sm90, and a CPU process that reports compute capability 9.0
    (sparsec's key block reads it); skipped where FA4 is not installed."""
    if fa4._interface() is None:
        pytest.skip("FlashAttention-4 is not installed (scripts/setup.sh installs it, --no-deps)")
    for name, value in (("FLASH_ATTENTION_ARCH", "sm_90"), ("CUTE_DSL_ARCH", "sm_90a"),
                        ("FLASH_ATTENTION_NUM_SMS", "132")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    # The CuTe DSL reads CUTE_DSL_ARCH when it is imported (here, maybe by an earlier test).
    from cutlass.cutlass_dsl import CuTeDSL
    monkeypatch.setattr(CuTeDSL._get_dsl().envar, "_arch", "sm_90a")
    device_arch = fa4.interface()._get_device_arch
    device_arch.cache_clear()
    yield
    device_arch.cache_clear()


def _compile_on_fake_cuda(groups: list[HeadGroup], num_heads: int, n_q: int, n_k: int, causal: bool,
                          head_dim: int) -> None:
    """Build the site's tables on the CPU and compile its FA4 call on fake CUDA tensors of
    the same shapes (FA4 compiles from shapes, dtypes and strides; nothing runs)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    cpu = torch.device("cpu")
    tables = fa4.build_tables(groups, num_heads, n_q, n_k, causal, fa4.key_block(head_dim, cpu), cpu)
    with FakeTensorMode():
        def on_cuda(tensor):
            return torch.empty(tensor.shape, dtype=tensor.dtype, device="cuda")
        fake = dataclasses.replace(tables, **{field.name: on_cuda(getattr(tables, field.name))
                                             for field in dataclasses.fields(tables)
                                             if isinstance(getattr(tables, field.name), torch.Tensor)})
        q = torch.empty(1, num_heads, n_q, head_dim, dtype=torch.bfloat16, device="cuda")
        k = torch.empty(1, num_heads // 2, n_k, head_dim, dtype=torch.bfloat16, device="cuda")
        fa4.tables_call(fake, head_dim ** -0.5)(q, k, k, torch.empty_like(q))


@pytest.mark.parametrize("case", [case for case in CASES if fa4.family_terms(_kind(case)) is not None])
def test_every_family_compiles_for_sm90_without_a_gpu(sm90_without_a_gpu, case):
    """The mask_mod sparsec generates for the family and its block tables go through FA4's
    sm90 compiler (GQA 2:1, a length off the blocks, two of four heads served)."""
    _compile_on_fake_cuda([HeadGroup(_kind(case), CASES[case], [0, 3])], 4, 1000, 1000, True, 128)


@pytest.mark.parametrize("head_dim", [64, 256])
def test_a_mixed_site_compiles_for_sm90_without_a_gpu(sm90_without_a_gpu, head_dim):
    """Every family in one site (one call, per-head tables), n_q != n_k, at head dims 64 and
    256 (whose key block is FA4's 80-wide tile)."""
    cases = [case for case in CASES if fa4.family_terms(_kind(case)) is not None and case != "skip"]
    groups = [HeadGroup(_kind(case), CASES[case], [head]) for head, case in enumerate(cases)]
    _compile_on_fake_cuda(groups, 2 * math.ceil(len(groups) / 2), 700, 900, False, head_dim)
