"""ONNX export and onnxruntime: the block-sparse kernel behind the custom op equals the
reference; custom-op and decomposed exports run in onnxruntime and equal the compiled
PyTorch model (fp32, atol = rtol = 1e-4) at two lengths from one export; custom ==
decomposed; the checker passes; a custom-op model fails cleanly without sparsec's
registration, and an unknown sparsec op version is rejected with a typed error."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from torch import nn

import sparsec
from sparsec.tools import cli
from models import build_bert, build_llama_gqa, build_vit, bert_inputs, llama_inputs, vit_inputs
from sparsec.codegen.onnx import export_onnx
from sparsec.codegen.onnx.schema import DOMAIN, SPARSE_ATTENTION
from sparsec.ir.errors import ArtifactVersionError, UnservableInputError
from sparsec.passes.canonicalize import Canonicalize
from sparsec.testing.plant_patterns import PlantPatterns
from sparsec.passes.helpers.capture import capture
from sparsec.passes.lower import Lower
from sparsec.ir.plan import HeadGroup, Plan, encode_groups
from sparsec.runtime import cpu_attention
from sparsec.ir import reference
from sparsec.runtime.ort import ort_feeds, ort_session
from sparsec.weights.storage import compress
from sparsec.weights.structures import parse_structure

TOL = {"atol": 1e-4, "rtol": 1e-4}
BLOCK_TOPK = ("block_topk", {"block": 8, "grid": [3, 3], "blocks": [[1, 0], [2, 1], [2, 0]]})
PATTERNS = [
    ("window", {"window": [3, 0.1]}),
    ("sink_window", {"sink": [2, 0], "window": [4, 0]}),
    ("vertical_stripe", {"columns": [0, 7, 30, 100], "window": [3, 0]}),
    ("multi_diagonal", {"period": [9, 0], "width": [2, 0], "count": 3}),
    BLOCK_TOPK,
    ("vertical_slash", {"vertical": [3, 0.05], "slash": [3, 0], "queries": 8}),
    ("dynamic_blocks", {"block": 8, "samples": 3, "share": 0.8, "density": [0.5, 64, 0.3]}),
    ("dense", {}),
    ("skip", {}),
]


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    # Lengths here are <= 64: chunks of 8 query rows make the kernel gather several chunks.
    monkeypatch.setenv("SPARSEC_ORT_ROWS", "8")


def _first(result) -> torch.Tensor:
    """The first output of a model (a tensor, or a tuple / ModelOutput's first field)."""
    return result if isinstance(result, torch.Tensor) else result[0]


def _run(session, *args, **kwargs) -> np.ndarray:
    return session.run(None, ort_feeds(session, args, kwargs))[0]


# -- the kernel behind the custom op --

@pytest.mark.parametrize("pattern,params", PATTERNS, ids=[p for p, _ in PATTERNS])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n,bias_kind", [(37, None), (64, "padding"), (45, "per_head")])
def test_cpu_kernel_matches_reference(pattern, params, causal, n, bias_kind):
    # Chunks of 8 query rows, each gathering its own keys, spread over two worker threads.
    torch.manual_seed(n)
    batch, heads, kv_heads, dim = 2, 4, 2, 8
    q = torch.randn(batch, heads, n, dim)
    k, v = torch.randn(batch, kv_heads, n, dim), torch.randn(batch, kv_heads, n, dim)
    bias = None
    if bias_kind == "padding":
        bias = torch.zeros(batch, 1, 1, n).masked_fill(torch.arange(n) >= n - 5, float("-inf"))
    elif bias_kind == "per_head" and not (pattern == "dense" and causal):   # SDPA: mask or causal
        bias = torch.randn(batch, heads, n, n)
    expected = reference.sparse_attention(q, k, v, bias, 0.3, causal, [HeadGroup(pattern, params, list(range(heads)))])
    got = cpu_attention.group_attention(q, k, v, bias, 0.3, causal, pattern, params, rows=8, workers=2)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_gather_plan_reads_only_kept_keys():
    plan = cpu_attention.static_plan("window", json.dumps({"window": [8, 0]}), 256, 256, True, 16)
    # A causal 8-wide window: chunk c of 16 rows reads keys 16c - 7 ... 16c + 15 (the first
    # chunk, at the sequence start, its own 16).
    assert [c.keys.tolist() for c in plan.chunks[:2]] == [list(range(16)), list(range(9, 32))]
    assert all(torch.equal(c.keys, torch.arange(16 * i - 7, 16 * i + 16)) for i, c in enumerate(plan.chunks) if i)
    assert plan.gathered_fraction == pytest.approx((16 + 15 * 23) / (16 * 256))


# -- a hand-written GQA module with every family, captured directly --

GROUPS = [HeadGroup("window", {"window": [3, 0.1]}, [0, 3]),
          HeadGroup("dense", {}, [1]),
          HeadGroup(*BLOCK_TOPK, [2]),
          HeadGroup("vertical_slash", {"vertical": [3, 0], "slash": [3, 0], "queries": 8}, [4, 5]),
          HeadGroup("sink_window", {"sink": [2, 0], "window": [3, 0]}, [6]),
          HeadGroup("multi_diagonal", {"period": [7, 0], "width": [2, 0], "count": 0}, [7]),
          HeadGroup("vertical_stripe", {"columns": [1, 9, 200], "window": [2, 0.05]}, [8]),
          HeadGroup("skip", {}, [9])]


class AllPatterns(nn.Module):
    """10 query heads over 5 key/value heads; a padding mask; every pattern family
    (``sparse=False``: the canonical dense attention, for sparsec.compile to plant them)."""

    def __init__(self, causal: bool, sparse: bool = True, dim: int = 32):
        super().__init__()
        self.causal, self.sparse = causal, sparse
        self.q, self.kv = nn.Linear(dim, 10 * 8), nn.Linear(dim, 2 * 5 * 8)
        self.groups = encode_groups(GROUPS)

    def forward(self, x, padding):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, 10, 8).transpose(1, 2)
        k, v = self.kv(x).view(b, n, 2, 5, 8).permute(2, 0, 3, 1, 4)
        mask = padding[:, None, None, :].bool()
        if not self.sparse:
            return torch.ops.sparsec.attention(q, k, v, mask, 8 ** -0.5, self.causal)
        return torch.ops.sparsec.sparse_attention(q, k, v, mask, 8 ** -0.5, self.causal, self.groups)


def _padded(batch: int, n: int):
    x = torch.randn(batch, n, 32)
    padding = torch.ones(batch, n)
    padding[-1, n - 4:] = 0
    return x, padding


@pytest.fixture(scope="module", params=[True, False], ids=["causal", "bidirectional"])
def all_patterns(request, tmp_path_factory):
    torch.manual_seed(0)
    example = _padded(2, 24)
    gm, record = capture(AllPatterns(request.param).eval(), example, {})
    plan = Plan(target="cpu", capture=record)
    folder = tmp_path_factory.mktemp("all_patterns")
    paths = {mode: export_onnx(gm, example, {}, plan, folder / f"{mode}.onnx", mode=mode)
             for mode in ("custom", "decomposed")}
    return gm, plan, paths


@pytest.mark.parametrize("mode", ["custom", "decomposed"])
def test_module_matches_compiled_at_two_lengths(all_patterns, mode):
    gm, _plan, paths = all_patterns
    session = ort_session(paths[mode])
    for batch, n in [(2, 24), (3, 45)]:
        x, padding = _padded(batch, n)
        with torch.no_grad():
            expected = gm(x, padding)
        np.testing.assert_allclose(_run(session, x, padding), expected.numpy(), **TOL)


def test_custom_equals_decomposed_in_stock_onnxruntime(all_patterns):
    _gm, _plan, paths = all_patterns
    x, padding = _padded(2, 61)
    stock = onnxruntime.InferenceSession(str(paths["decomposed"]), providers=["CPUExecutionProvider"])
    custom = ort_session(paths["custom"])
    np.testing.assert_allclose(_run(custom, x, padding), _run(stock, x, padding), **TOL)


def test_custom_graph_one_node_per_group(all_patterns):
    _gm, plan, paths = all_patterns
    model = onnx.load(paths["custom"])
    onnx.checker.check_model(model, full_check=True)
    nodes = [n for n in model.graph.node if n.domain == DOMAIN]
    assert [n.op_type for n in nodes] == [SPARSE_ATTENTION] * len(GROUPS)
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nodes]
    assert [a["pattern"].decode() for a in attrs] == [g.pattern for g in GROUPS]
    # block_topk's layout is a boolean initializer, not JSON.
    layout_input = nodes[2].input[4]
    layouts = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    assert "blocks" not in json.loads(attrs[2]["params"])
    assert layouts[layout_input].dtype == bool and layouts[layout_input].sum() == 3
    metadata = {p.key: p.value for p in model.metadata_props}
    assert metadata["sparsec.version"] == sparsec.__version__
    assert Plan.from_json(metadata["sparsec.plan"]).to_dict() == plan.to_dict()


def test_decomposed_is_standard_ops_only(all_patterns):
    _gm, _plan, paths = all_patterns
    model = onnx.load(paths["decomposed"])
    onnx.checker.check_model(model, full_check=True)
    assert {n.domain for n in model.graph.node} == {""}
    assert {"ScatterElements", "TopK"} <= {n.op_type for n in model.graph.node}   # vertical_slash


def test_unregistered_custom_model_fails_in_onnxruntime(all_patterns):
    _gm, _plan, paths = all_patterns
    with pytest.raises(Exception, match=f"{DOMAIN}:{SPARSE_ATTENTION}") as error:
        onnxruntime.InferenceSession(str(paths["custom"]), providers=["CPUExecutionProvider"])
    assert "onnxruntime" in type(error.value).__module__


def test_unknown_op_version_is_rejected(all_patterns, tmp_path):
    _gm, _plan, paths = all_patterns
    model = onnx.load(paths["custom"])
    next(e for e in model.opset_import if e.domain == DOMAIN).version = 2
    onnx.save(model, tmp_path / "tampered.onnx")
    with pytest.raises(ArtifactVersionError, match="version 2"):
        ort_session(tmp_path / "tampered.onnx")


def test_fixed_length_decomposed_stores_masks(tmp_path):
    torch.manual_seed(1)
    example = _padded(2, 24)
    gm, record = capture(AllPatterns(True).eval(), example, {})
    path = export_onnx(gm, example, {}, Plan(target="cpu", capture=record), tmp_path / "fixed.onnx",
                       mode="decomposed", dynamic_length=False)
    model = onnx.load(path)
    masks = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.BOOL and list(i.dims) == [24, 24]]
    assert len(masks) == 5        # window, block_topk, sink_window, multi_diagonal, vertical_stripe
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x, padding = _padded(2, 24)
    np.testing.assert_allclose(_run(session, x, padding), gm(x, padding).detach().numpy(), **TOL)


@pytest.mark.parametrize("mode", ["custom", "decomposed"])
def test_float16_model(mode, tmp_path):
    # The attention runs in fp32 (as the reference), cast around; linears stay fp16.
    torch.manual_seed(4)
    model = AllPatterns(True).eval().half()
    x, padding = _padded(2, 24)
    gm, record = capture(model, (x.half(), padding), {})
    path = export_onnx(gm, (x.half(), padding), {}, Plan(target="cpu", capture=record), tmp_path / "half.onnx",
                       mode=mode)
    session = ort_session(path)
    x, padding = _padded(3, 37)
    with torch.no_grad():
        expected = gm(x.half(), padding).float().numpy()
    got = _run(session, x.half(), padding)
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), expected, atol=2e-3, rtol=2e-3)


def test_op_failure_raises_instead_of_aborting(all_patterns):
    _gm, _plan, paths = all_patterns
    session = ort_session(paths["custom"])
    x, padding = _padded(2, 24)
    with pytest.raises(UnservableInputError, match="SparseAttention failed"):
        _run(session, x, padding[:, :20])           # a padding mask of the wrong length
    np.testing.assert_allclose(_run(session, x, padding), _run(session, x, padding))   # still usable


def test_unknown_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match="decomposed"):
        export_onnx(None, (), {}, Plan(target="cpu"), tmp_path / "m.onnx", mode="sparse")


# -- sparse linears: compressed initializers, decompressed by standard ops --

@pytest.mark.parametrize("structure", ["unstructured", "2:4", "block8"])
def test_sparse_linear_runs_in_stock_onnxruntime(structure, tmp_path):
    torch.manual_seed(3)
    weight = torch.randn(48, 64)
    values, packed, layout = compress(weight, parse_structure(structure).mask(weight.abs(), 0.5), structure)

    class SparseLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("values", values)
            self.register_buffer("packed", packed)
            self.bias = nn.Parameter(torch.randn(48))

        def forward(self, x):
            return torch.ops.sparsec.sparse_linear(x, self.values, self.packed, self.bias, layout.encode())

    example = torch.randn(2, 5, 64)
    gm, record = capture(SparseLinear().eval(), (example,), {})
    path = export_onnx(gm, (example,), {}, Plan(target="cpu", capture=record), tmp_path / "linear.onnx",
                       mode="decomposed")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 7, 64)
    np.testing.assert_allclose(_run(session, x), gm(x).detach().numpy(), **TOL)


# -- Hugging Face models through sparsec.compile, planted patterns --

HF_PATTERNS = {0: ("window", {"window": [3, 0.1]}), 1: ("sink_window", {"sink": [2, 0], "window": [4, 0]}),
               2: ("vertical_slash", {"vertical": [3, 0], "slash": [2, 0], "queries": 8}), 3: BLOCK_TOPK}
# name -> (builder, inputs, two (batch, seq) calls); ViT's position embeddings fix its length.
HF_MODELS = {"llama_gqa_causal_rope": (build_llama_gqa, llama_inputs, [(2, 24), (3, 45)]),
             "bert_padding_mask": (build_bert, bert_inputs, [(2, 20), (3, 37)]),
             "vit": (build_vit, vit_inputs, [(2, 16), (3, 16)])}


@pytest.mark.parametrize("name", list(HF_MODELS))
def test_hf_model_onnx_matches_compiled(name, tmp_path):
    builder, inputs, calls = HF_MODELS[name]
    model, example = builder()
    compiled = sparsec.compile(model, example, passes=[Canonicalize(), PlantPatterns([HF_PATTERNS]), Lower()])
    paths = {mode: compiled.export_onnx(tmp_path / f"{mode}.onnx", mode=mode) for mode in ("custom", "decomposed")}
    sessions = {mode: ort_session(path) for mode, path in paths.items()}
    for batch, seq in calls:
        call = inputs(batch, seq)
        with torch.no_grad():
            expected, dense = _first(compiled(**call)).numpy(), _first(model(**call)).numpy()
        custom, decomposed = _run(sessions["custom"], **call), _run(sessions["decomposed"], **call)
        np.testing.assert_allclose(custom, expected, **TOL)
        np.testing.assert_allclose(decomposed, expected, **TOL)
        np.testing.assert_allclose(custom, decomposed, **TOL)
        assert np.abs(custom - dense).max() > 1e-3      # the planted patterns do change the output


# -- command line --

def test_cli_export_and_run_onnx(tmp_path, capsys):
    torch.manual_seed(2)
    example = _padded(2, 24)
    model = AllPatterns(False, sparse=False).eval()
    planted = {head: (g.pattern, g.params) for g in GROUPS for head in g.heads}
    compiled = sparsec.compile(model, example, passes=[Canonicalize(), PlantPatterns([planted]), Lower()])
    compiled.save(tmp_path / "artifact")
    assert cli.main(["export", str(tmp_path / "artifact"), str(tmp_path / "m.onnx")]) == 0
    x, padding = _padded(1, 40)
    np.savez(tmp_path / "in.npz", x=x.numpy(), padding=padding.numpy())
    assert cli.main(["run-onnx", str(tmp_path / "m.onnx"), "--inputs", str(tmp_path / "in.npz"),
                     "--output", str(tmp_path / "out.npz"), "--repeat", "2"]) == 0
    with np.load(tmp_path / "out.npz") as out, torch.no_grad():
        np.testing.assert_allclose(out[out.files[0]], compiled(x, padding).numpy(), **TOL)
    capsys.readouterr()
    # Synthetic inputs: the example's shapes, the sequence dimensions set to 33.
    inputs = onnx.load(tmp_path / "m.onnx").graph.input
    dims = [f"{i.type.tensor_type.shape.dim[1].dim_param}=33" for i in inputs]
    assert cli.main(["run-onnx", str(tmp_path / "m.onnx"), "--dim", dims[0], "--dim", dims[1]]) == 0
    assert "float32[2, 10, 33, 8]" in capsys.readouterr().out
