"""A compiled model's runner (runtime/fast_graph.py): torch's bindings for the listed overloads,
sparsec's kernels without the dispatcher; the same results as the canonical graph, bit for bit."""
import pytest
import torch

import sparsec
from sparsec.ir.plan import HeadGroup, encode_groups
from sparsec.runtime.device_kernels import sparse_attention_direct
from sparsec.runtime.fast_graph import BINDINGS, fast_graph
from sparsec.testing.planted import planted_llama, planted_llama_inputs

aten = torch.ops.aten
_g = torch.Generator().manual_seed(7)


def _r(*shape, positive=False):
    x = torch.randn(*shape, generator=_g)
    return x.abs() + 0.1 if positive else x


# Sample calls of every overload BINDINGS maps (awkward sizes, kwargs where the schema has them).
SAMPLES = {
    aten.add.Tensor: [((_r(3, 5), _r(3, 5)), {}), ((_r(3, 5), _r(5)), {"alpha": 0.5}), ((_r(2, 3), 2.0), {})],
    aten.sub.Tensor: [((_r(3, 5), _r(3, 5)), {"alpha": 2})],
    aten.mul.Tensor: [((_r(3, 5), _r(3, 1)), {}), ((_r(4, 3), 0.125), {})],
    aten.div.Tensor: [((_r(3, 5), _r(3, 5, positive=True)), {})],
    aten.neg.default: [((_r(3, 7),), {})],
    aten.pow.Tensor_Scalar: [((_r(3, 7), 2), {})],
    aten.rsqrt.default: [((_r(3, 7, positive=True),), {})],
    aten.exp.default: [((_r(3, 7),), {})],
    aten.tanh.default: [((_r(3, 7),), {})],
    aten.sigmoid.default: [((_r(3, 7),), {})],
    aten.mean.dim: [((_r(2, 3, 7), [-1], True), {}), ((_r(2, 3, 7), [0, 2]), {})],
    aten.mm.default: [((_r(3, 5), _r(5, 7)), {})],
    aten.bmm.default: [((_r(2, 3, 5), _r(2, 5, 7)), {})],
    aten.matmul.default: [((_r(2, 3, 5), _r(5, 7)), {})],
    aten.addmm.default: [((_r(7), _r(3, 5), _r(5, 7)), {"beta": 0.5, "alpha": 2.0})],
    aten.linear.default: [((_r(2, 3, 5), _r(7, 5), _r(7)), {}), ((_r(3, 5), _r(7, 5)), {})],
    aten.silu.default: [((_r(3, 7),), {})],
    aten.gelu.default: [((_r(3, 7),), {}), ((_r(3, 7),), {"approximate": "tanh"})],
    aten.layer_norm.default: [((_r(2, 3, 6), [6], _r(6), _r(6), 1e-5), {})],
    aten.embedding.default: [((_r(11, 4), torch.randint(0, 11, (2, 5), generator=_g)), {})],
    aten.t.default: [((_r(3, 5),), {})],
    aten.transpose.int: [((_r(2, 3, 5), 0, 2), {})],
    aten.permute.default: [((_r(2, 3, 5), [2, 0, 1]), {})],
    aten.unsqueeze.default: [((_r(3, 5), 1), {})],
    aten.reshape.default: [((_r(2, 3, 5), [-1, 5]), {})],
    aten.view.default: [((_r(2, 3, 5), [6, 5]), {})],
    aten.cat.default: [(([_r(2, 3), _r(2, 4)], 1), {}), (([_r(2, 3), _r(1, 3)],), {})],
    aten.select.int: [((_r(2, 3, 5), 1, 2), {})],
    aten.to.dtype: [((_r(3, 5), torch.float64), {}), ((_r(3, 5), torch.bfloat16), {})],
    aten.clone.default: [((_r(3, 5).t(),), {"memory_format": torch.contiguous_format})],
}


def test_every_mapped_overload_has_samples():
    assert set(SAMPLES) == {op for op in BINDINGS if op.namespace == "aten"}


@pytest.mark.parametrize("overload", list(SAMPLES), ids=str)
def test_the_binding_computes_what_the_overload_computes(overload):
    for args, kwargs in SAMPLES[overload]:
        expected, got = overload(*args, **kwargs), BINDINGS[overload](*args, **kwargs)
        assert got.dtype == expected.dtype and got.shape == expected.shape and got.stride() == expected.stride()
        assert torch.equal(got, expected), overload


def test_sparse_attention_direct_is_the_op_on_cpu():
    q, k, v = _r(2, 4, 70, 16), _r(2, 2, 70, 16), _r(2, 2, 70, 16)
    table = encode_groups([HeadGroup("sink_window", {"sink": [2, 0], "window": [9, 0]}, [0, 3]),
                           HeadGroup("dense", {}, [1, 2])])
    assert torch.equal(sparse_attention_direct(q, k, v, None, 0.25, True, table),
                       torch.ops.sparsec.sparse_attention(q, k, v, None, 0.25, True, table))


@pytest.mark.filterwarnings("ignore:sparsec. compiled for h100 but running on CPU")
def test_a_compiled_model_runs_the_fast_graph_with_the_canonical_graphs_results():
    torch.manual_seed(0)
    model = planted_llama(layers=2, heads=8, kv_heads=2, head_dim=64, hidden=256, intermediate=256)
    ids = planted_llama_inputs(batch=2, length=256, seed=0)
    compiled = sparsec.compile(model, (ids,), target="h100", seq_len=16384, tolerance=None)
    assert any(not h.is_dense for site in compiled.plan.attention for h in site.heads)
    runner = compiled._runner
    assert "torch.ops.aten.linear" not in runner.code and "torch.ops.sparsec" not in runner.code
    # The same tensors, not copies.
    assert {p.data_ptr() for p in runner.parameters()} == {p.data_ptr() for p in compiled.graph_module.parameters()}
    with torch.no_grad():
        for batch, length in ((2, 256), (3, 131)):
            x = planted_llama_inputs(batch=batch, length=length, seed=length)
            assert torch.equal(compiled(x), compiled.graph_module(x))


def test_fast_graph_keeps_the_input_and_output_structure():
    class TwoOutputs(torch.nn.Module):
        def forward(self, x, *, scale):
            return {"y": torch.nn.functional.silu(x @ x.T) * scale, "z": x.mean(-1)}

    gm = torch.export.export(TwoOutputs(), (_r(3, 4),), {"scale": _r(1)}).module()
    fast = fast_graph(gm)
    x, scale = _r(3, 4), _r(1)
    expected, got = gm(x, scale=scale), fast(x, scale=scale)
    assert set(got) == {"y", "z"} and all(torch.equal(got[key], expected[key]) for key in expected)
