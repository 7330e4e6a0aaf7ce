"""The compiled model owns its weights, legal inputs never crash
untyped, and ordinary mistakes get typed errors that name the fix."""
import pytest
import torch
import torch.nn.functional as F

import sparsec
from sparsec.ir.errors import (CalibrationMismatchError, InvalidArgumentError, SparsecError,
                            UnservableInputError, UnsupportedDtypeError)
from sparsec.passes.canonicalize import Canonicalize
from sparsec.passes.fuse_heads import FuseHeads
from sparsec.passes.lower import Lower
from sparsec.patterns import get_pattern
from sparsec.patterns.base import N
from sparsec.ir.plan import HeadGroup
from sparsec.ir.reference import dense_attention, sparse_attention
from sparsec.testing.plant_patterns import PlantPatterns

WINDOW = ("window", {"window": [5, 0]})
SINK = ("sink_window", {"sink": [2, 0], "window": [4, 0]})


class Attention(torch.nn.Module):
    """q/k/v/o projections and SDPA; optionally a learned temperature on q and a learned
    per-key additive bias ``[N]`` (rank 1) as the attention mask."""

    def __init__(self, dim=32, heads=4, temperature=False, key_bias=False, max_len=64):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v, self.o = (torch.nn.Linear(dim, dim) for _ in range(4))
        self.temperature = torch.nn.Parameter(torch.tensor(0.7)) if temperature else None
        self.key_bias = torch.nn.Parameter(torch.randn(max_len)) if key_bias else None

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (proj(x).view(b, n, self.heads, self.head_dim).transpose(1, 2) for proj in (self.q, self.k, self.v))
        if self.temperature is not None:
            q = q * self.temperature
        mask = None if self.key_bias is None else self.key_bias[:n]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o(y.transpose(1, 2).reshape(b, n, -1))


class TwoLayers(torch.nn.Module):
    def __init__(self, **options):
        super().__init__()
        self.first, self.second = Attention(**options), Attention(**options)

    def forward(self, x):
        return self.second(self.first(x))


def _planted(model, x, heads=(WINDOW, SINK, WINDOW, SINK)):
    """Compile with fixed sparse patterns (heads of one pattern not adjacent, so fuse_heads
    permutes the q/k/v/o weights)."""
    passes = [Canonicalize(), PlantPatterns([list(heads)]), FuseHeads(), Lower()]
    return sparsec.compile(model, (x,), passes=passes)


# -- the compiled model owns copies of its weights --------------------------------------------

@pytest.mark.parametrize("temperature", [False, True])
@pytest.mark.parametrize("change", ["optimizer_step", "load_state_dict"])
def test_changing_the_original_after_compile_does_not_reach_the_compiled_model(temperature, change):
    torch.manual_seed(0)
    model, x = TwoLayers(temperature=temperature).eval(), torch.randn(2, 16, 32)
    with torch.no_grad():
        original_output = model(x)
    compiled = _planted(model, x)
    assert {s.fusion.strategy for s in compiled.plan.attention} == {"weights"}
    with torch.no_grad():
        before = compiled(x)
        # compile did not touch the user's model
        torch.testing.assert_close(model(x), original_output, rtol=0, atol=0)
        if change == "optimizer_step":
            optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
            with torch.enable_grad():
                model(x).square().sum().backward()
            optimizer.step()
        else:
            model.load_state_dict(TwoLayers(temperature=temperature).state_dict())
        assert not torch.allclose(model(x), original_output)
        torch.testing.assert_close(compiled(x), before, rtol=0, atol=0)


def test_compiled_weights_are_not_the_users_tensors():
    model, x = TwoLayers().eval(), torch.randn(2, 16, 32)
    compiled = sparsec.compile(model, (x,), tolerance=None)
    users = {t.data_ptr() for t in model.parameters()}
    assert not users & {t.data_ptr() for t in compiled.graph_module.parameters()}


# -- legal inputs that crashed -----------------------------------------------------------------

VERTICAL_SLASH = get_pattern("vertical_slash")


@pytest.mark.parametrize("n_q,n_k,queries", [(4, 3, 64), (7, 2, 64), (9, 4, 6), (4, 3, 0)])
def test_vertical_slash_with_more_queries_than_keys_keeping_every_line_is_dense(n_q, n_k, queries):
    """Cross-attention (n_q > n_k, more estimating queries than keys): every column and diagonal kept is dense."""
    torch.manual_seed(n_q + n_k)
    q, k, v = torch.randn(1, 2, n_q, 8), torch.randn(1, 2, n_k, 8), torch.randn(1, 2, n_k, 8)
    params = {"vertical": [n_k, 0], "slash": [n_q + n_k, 0], "queries": queries}
    out = sparse_attention(q, k, v, None, 0.35, False, [HeadGroup("vertical_slash", params, [0, 1])])
    torch.testing.assert_close(out, dense_attention(q, k, v, None, 0.35, False))


def test_vertical_slash_offsets_below_minus_n_k_are_kept_where_chosen():
    """Offset -3 exists only because n_q > n_k (query 0 against key 2 at n_q=4, n_k=3)."""
    mask = VERTICAL_SLASH.dynamic_mask(torch.tensor([[[0]]]), torch.tensor([[[-3, 0]]]), 4, 3, False)
    expected = torch.tensor([[1, 0, 1], [1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    assert torch.equal(mask[0, 0], expected)


def test_vertical_slash_estimate_finds_the_heaviest_diagonal_of_cross_attention():
    """Keys equal to the queries of offset -2 (query i attends key i - ... ) score highest there."""
    n_q, n_k = 6, 3
    k = torch.eye(n_k, 8)[None, None] * 10
    q = torch.zeros(1, 1, n_q, 8)
    for i in range(n_q):
        j = i + (n_k - n_q) + 2                           # offset d = i + (n_k - n_q) - j = -2
        if 0 <= j < n_k:
            q[0, 0, i] = k[0, 0, j]
    columns, diagonals = VERTICAL_SLASH.estimate_indices({"vertical": [1, 0], "slash": [2, 0], "queries": 64},
                                                         q, k, 1.0, False)
    assert columns.tolist() == [[[0]]] and diagonals.tolist() == [[[-2, 0]]]


def test_learned_per_key_bias_with_sparse_heads_compiles_and_matches_the_reference():
    """A rank-1 ``[N]`` additive mask: calibration, classification and sparse lowering."""
    torch.manual_seed(0)
    model, x = TwoLayers(key_bias=True).eval(), torch.randn(2, 24, 32)
    compiled = sparsec.compile(model, (x,), tolerance=None, recall=0.3)       # used to raise IndexError
    plan = compiled.plan
    for site in plan.attention:
        for head in site.heads:
            head.assign("window", {"window": [64, 0]}, "edited: wider than N, dense-equal")
        site.regroup()
    sparse = sparsec.compile(model, (x,), plan=plan, tolerance=None)
    assert all(h.pattern == "window" for s in sparse.plan.attention for h in s.heads)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), model(x), rtol=1e-4, atol=1e-5)
        longer = torch.randn(3, 40, 32)
        torch.testing.assert_close(sparse(longer), model(longer), rtol=1e-4, atol=1e-5)


MULTI_DIAGONAL = get_pattern("multi_diagonal")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("period,width,count", [(3, 3, 1), (5, 4, 1), (7, 5, 1)])
def test_multi_diagonal_main_band_keeps_its_documented_width(period, width, count, causal):
    """count=1 keeps the main band |d| < width, whatever the period (issue: width > period/2
    kept only |d| <= period/2); the count agrees with pairs() and the documented pairs_expr."""
    params = {"period": [period, 0], "width": [width, 0], "count": count}
    n = 20
    mask = MULTI_DIAGONAL.mask(params, n, n, causal)
    d = torch.arange(n)[:, None] - torch.arange(n)[None, :]
    expected = (d.abs() < width) & ((d >= 0) if causal else True)
    assert torch.equal(mask, expected)
    assert MULTI_DIAGONAL.pairs(params, n, causal) == int(mask.sum())
    assert float(MULTI_DIAGONAL.pairs_expr(params, causal).subs(N, n)) == int(mask.sum())


def test_multi_diagonal_overlapping_bands_keep_every_offset_near_a_kept_diagonal():
    params = {"period": [3, 0], "width": [3, 0], "count": 2}          # diagonals -3, 0, 3; width 3
    mask = MULTI_DIAGONAL.mask(params, 12, 12, False)
    d = torch.arange(12)[:, None] - torch.arange(12)[None, :]
    assert torch.equal(mask, d.abs() <= 5)


# -- messages that name the fix ----------------------------------------------------------------

def test_integer_inputs_to_a_float_model_raise_a_typed_error_naming_the_cast():
    with pytest.raises(UnsupportedDtypeError, match=r"x\.float\(\)"):
        sparsec.compile(TwoLayers().eval(), (torch.randint(0, 5, (2, 16, 32)),))


def test_meta_device_model_is_refused():
    with pytest.raises(InvalidArgumentError, match="meta device.*load real weights"):
        sparsec.compile(TwoLayers().to("meta"), (torch.randn(2, 16, 32),))


def test_meta_device_inputs_are_refused():
    with pytest.raises(InvalidArgumentError, match="meta device.*real tensors"):
        sparsec.compile(TwoLayers().eval(), (torch.randn(2, 16, 32, device="meta"),))


def test_batch_one_example_with_batch_three_calibration_names_both_fixes():
    with pytest.raises(CalibrationMismatchError, match="batch and sequence sizes are at least 2.*calibrate at"):
        sparsec.compile(TwoLayers().eval(), (torch.randn(1, 16, 32),), calibration=[(torch.randn(3, 16, 32),)])


@pytest.fixture(scope="module")
def compiled_two_layers():
    torch.manual_seed(0)
    return sparsec.compile(TwoLayers().eval(), (torch.randn(2, 16, 32),), tolerance=None)


def test_wrong_hidden_size_says_the_hidden_size_differs(compiled_two_layers):
    with pytest.raises(UnservableInputError) as raised:
        compiled_two_layers(torch.randn(2, 16, 48))
    message = str(raised.value)
    assert "fixed size 32" in message and "dimension 2" in message and "at least 2" not in message


def test_batch_fixed_by_a_size_one_example_names_the_recompile():
    compiled = sparsec.compile(TwoLayers().eval(), (torch.randn(1, 16, 32),), tolerance=None)
    with pytest.raises(UnservableInputError, match=r"has size 3 on dimension 0, but its example size was 1.*at least 2"):
        compiled(torch.randn(3, 16, 32))


def test_compile_restores_the_users_training_modes():
    model = TwoLayers().train()
    model.second.eval()                                        # mixed modes come back as they were
    sparsec.compile(model, (torch.randn(2, 16, 32),), tolerance=None)
    assert model.training and model.first.training and not model.second.training


def test_onnx_export_refuses_unsupported_opsets(compiled_two_layers, tmp_path):
    for opset in (5, 17, 99):
        with pytest.raises(InvalidArgumentError, match="opset .* from 18 to"):
            compiled_two_layers.export_onnx(tmp_path / "model.onnx", opset=opset)
    assert not (tmp_path / "model.onnx").exists()


def test_onnx_export_refuses_bfloat16_models(tmp_path):
    model = TwoLayers().eval().to(torch.bfloat16)
    compiled = sparsec.compile(model, (torch.randn(2, 16, 32, dtype=torch.bfloat16),), tolerance=None)
    with pytest.raises(UnsupportedDtypeError, match="bfloat16.*model.float"):
        compiled.export_onnx(tmp_path / "model.onnx", mode="decomposed")
    assert isinstance(UnsupportedDtypeError("x"), SparsecError)


class CrossAttention(torch.nn.Module):
    """Queries from ``x``, keys and values from ``context`` of another length; vertical_slash."""

    def __init__(self, dim=16):
        super().__init__()
        self.q, self.kv = torch.nn.Linear(dim, 2 * 8), torch.nn.Linear(dim, 2 * 2 * 8)
        from sparsec.ir.plan import encode_groups

        self.groups = encode_groups([HeadGroup("vertical_slash", {"vertical": [1, 0], "slash": [2, 0],
                                                                  "queries": 64}, [0, 1])])

    def forward(self, x, context):
        b, n_q, _ = x.shape
        q = self.q(x).view(b, n_q, 2, 8).transpose(1, 2)
        k, v = self.kv(context).view(b, context.shape[1], 2, 2, 8).permute(2, 0, 3, 1, 4)
        return torch.ops.sparsec.sparse_attention(q, k, v, None, 8 ** -0.5, False, self.groups)


def test_decomposed_onnx_vertical_slash_serves_more_queries_than_keys(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    from sparsec.codegen.onnx import export_onnx
    from sparsec.passes.helpers.capture import capture
    from sparsec.ir.plan import Plan

    torch.manual_seed(0)
    model = CrossAttention().eval()
    gm, record = capture(model, (torch.randn(2, 6, 16), torch.randn(2, 5, 16)), {})
    path = export_onnx(gm, (torch.randn(2, 6, 16), torch.randn(2, 5, 16)), {}, Plan(target="cpu", capture=record),
                       tmp_path / "cross.onnx", mode="decomposed")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    for n_q, n_k in ((7, 3), (4, 3), (3, 6)):
        x, context = torch.randn(2, n_q, 16), torch.randn(2, n_k, 16)
        with torch.no_grad():
            expected = model(x, context).numpy()
        (got,) = session.run(None, dict(zip(names, (x.numpy(), context.numpy()))))
        torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(expected), rtol=1e-4, atol=1e-5)


class MaskedHeads(torch.nn.Module):
    """multi_diagonal with overlapping bands and vertical_slash under a key padding mask."""

    def __init__(self, dim=16):
        super().__init__()
        self.qkv = torch.nn.Linear(dim, 3 * 2 * 8)
        from sparsec.ir.plan import encode_groups

        self.groups = encode_groups([
            HeadGroup("multi_diagonal", {"period": [3, 0], "width": [3, 0], "count": 2}, [0]),
            HeadGroup("vertical_slash", {"vertical": [2, 0], "slash": [1, 0], "queries": 64}, [1])])

    def forward(self, x, padding):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, 2, 8).permute(2, 0, 3, 1, 4)
        mask = padding[:, None, None, :].bool()
        return torch.ops.sparsec.sparse_attention(q, k, v, mask, 8 ** -0.5, False, self.groups)


def test_decomposed_onnx_matches_the_reference_for_masked_vertical_slash_and_wide_diagonals(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    from sparsec.codegen.onnx import export_onnx
    from sparsec.passes.helpers.capture import capture
    from sparsec.ir.plan import Plan

    torch.manual_seed(0)
    model = MaskedHeads().eval()

    def inputs(batch, n):
        padding = torch.ones(batch, n)
        padding[-1, n // 2:] = 0
        return torch.randn(batch, n, 16), padding

    gm, record = capture(model, inputs(2, 12), {})
    path = export_onnx(gm, inputs(2, 12), {}, Plan(target="cpu", capture=record), tmp_path / "masked.onnx",
                       mode="decomposed")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    for batch, n in ((2, 12), (3, 20)):
        x, padding = inputs(batch, n)
        with torch.no_grad():
            expected = model(x, padding).numpy()
        (got,) = session.run(None, dict(zip(names, (x.numpy(), padding.numpy()))))
        torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(expected), rtol=1e-4, atol=1e-5)
