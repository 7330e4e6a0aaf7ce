"""Before/expected graph tests for two rewrites (as TVM relax's test_transform_fuse_ops.py):
a tiny hand-written module is captured, the pass runs as the compiler runs it, and the
resulting graph is compared, node by node, with the graph written out below; the rewritten
module must also compute what the original does on random inputs at other shapes.

Graphs are rendered one node per line, ``name = target(args)``: shape reads
(``aten.sym_size``) are shown inline as ``x.size(d)``, floats at 6 significant digits, and
export's guard call is left out.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsec.passes.infra.pass_manager import CompileContext, PassManager
from sparsec.passes.canonicalize import Canonicalize
from sparsec.passes.helpers.capture import capture
from sparsec.passes.fuse_heads import FuseHeads
from sparsec.passes.lower import Lower
from sparsec.ir.plan import Plan
from sparsec.ir.targets import get_target
from sparsec.testing.plant_patterns import PlantPatterns

SYM_SIZE = torch.ops.aten.sym_size.int


def _arg(value) -> str:
    if isinstance(value, torch.fx.Node):
        if value.op == "call_function" and value.target is SYM_SIZE:
            return f"{value.args[0].name}.size({value.args[1]})"
        return value.name
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        inner = ", ".join(_arg(v) for v in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner}{',' if len(value) == 1 else ''})"
    return repr(value)


def render(gm: torch.fx.GraphModule) -> str:
    """The graph, one node per line (see the module docstring)."""
    lines = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            lines.append(f"{node.name} = input")
        elif node.op == "get_attr":
            lines.append(f"{node.name} = self.{node.target}")
        elif node.op == "output":
            lines.append(f"return {_arg(node.args[0])}")
        elif node.op == "call_function" and node.target is not SYM_SIZE:
            target = str(node.target).removeprefix("torch.ops.")
            kwargs = [f"{k}={_arg(v)}" for k, v in node.kwargs.items()]
            lines.append(f"{node.name} = {target}({', '.join([_arg(a) for a in node.args] + kwargs)})")
    return "\n".join(lines)


def assert_graph(gm: torch.fx.GraphModule, expected: str) -> None:
    actual = render(gm)
    expected = "\n".join(line.strip() for line in expected.splitlines() if line.strip())
    assert actual == expected, f"graph differs from the expected one; got:\n{actual}"


def _context(record: dict, args: tuple) -> CompileContext:
    target = get_target("cpu")
    return CompileContext(plan=Plan(target=target.name, capture=record), target=target,
                          example_args=args, example_kwargs={}, calibration=[])


def _captured(model: nn.Module, args: tuple) -> tuple[torch.fx.GraphModule, CompileContext]:
    gm, record = capture(model, args, {})
    return gm, _context(record, args)


def _assert_same(actual: nn.Module, expected: nn.Module, *shapes: tuple[int, ...]) -> None:
    with torch.no_grad():
        for shape in shapes:
            x = torch.randn(shape)
            torch.testing.assert_close(actual(x), expected(x), rtol=1e-5, atol=1e-5)


class _Heads(nn.Module):
    """q/k/v projections of a ``[B, N, 32]`` input into ``heads`` query and ``kv_heads`` kv heads of 8."""

    def __init__(self, heads: int = 4, kv_heads: int = 2, head_dim: int = 8, dim: int = 32):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q = nn.Linear(dim, heads * head_dim)
        self.k = nn.Linear(dim, kv_heads * head_dim)
        self.v = nn.Linear(dim, kv_heads * head_dim)

    def project(self, x):
        b, n, _ = x.shape
        return tuple(projection(x).view(b, n, heads, self.head_dim).transpose(1, 2)
                     for projection, heads in ((self.q, self.heads), (self.k, self.kv_heads), (self.v, self.kv_heads)))


# -- canonicalize ----------------------------------------------------------------------------

class EagerCausalGQA(_Heads):
    """Hugging Face's eager attention: repeat_kv, ``q @ kᵀ * scale``, a causal masked_fill,
    a float32 softmax cast back."""

    def repeat_kv(self, t):
        b, h, n, d = t.shape
        ratio = self.heads // self.kv_heads
        return t[:, :, None].expand(b, h, ratio, n, d).reshape(b, h * ratio, n, d)

    def forward(self, x):
        q, k, v = self.project(x)
        k, v = self.repeat_kv(k), self.repeat_kv(v)
        scores = torch.matmul(q, k.transpose(-2, -1)) * self.head_dim ** -0.5
        n = x.shape[1]
        keep = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        return torch.matmul(probs, v)


class SdpaCausal(_Heads):
    """``F.scaled_dot_product_attention(is_causal=True)`` with its default scale, GQA by ``enable_gqa``."""

    def forward(self, x):
        q, k, v = self.project(x)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


PROJECTIONS = """
    q_weight = self.q.weight
    q_bias = self.q.bias
    k_weight = self.k.weight
    k_bias = self.k.bias
    v_weight = self.v.weight
    v_bias = self.v.bias
    x = input
    linear = aten.linear.default(x, q_weight, q_bias)
    view = aten.view.default(linear, [x.size(0), x.size(1), 4, 8])
    transpose = aten.transpose.int(view, 1, 2)
    linear_1 = aten.linear.default(x, k_weight, k_bias)
    view_1 = aten.view.default(linear_1, [x.size(0), x.size(1), 2, 8])
    transpose_1 = aten.transpose.int(view_1, 1, 2)
    linear_2 = aten.linear.default(x, v_weight, v_bias)
    view_2 = aten.view.default(linear_2, [x.size(0), x.size(1), 2, 8])
    transpose_2 = aten.transpose.int(view_2, 1, 2)
"""

# repeat_kv stripped (k/v keep their 2 heads), scale folded, upcast and its cast back gone;
# the causal mask stays a bool keep-mask operand (fold_causal_mask turns it into causal=True).
EAGER_EXPECTED = PROJECTIONS + """
    ones = aten.ones.default([x.size(1), x.size(1)], dtype=torch.bool, device=device(type='cpu'), pin_memory=False)
    tril = aten.tril.default(ones)
    attention_default = sparsec.attention.default(transpose, transpose_1, transpose_2, tril, 0.353553, False)
    return (attention_default,)
"""

SDPA_EXPECTED = PROJECTIONS + """
    attention_default = sparsec.attention.default(transpose, transpose_1, transpose_2, None, 0.353553, True)
    return (attention_default,)
"""


@pytest.mark.parametrize("model_class,expected,source", [(EagerCausalGQA, EAGER_EXPECTED, "eager"),
                                                         (SdpaCausal, SDPA_EXPECTED, "sdpa")],
                         ids=["eager", "sdpa"])
def test_canonicalize(model_class, expected, source):
    torch.manual_seed(0)
    model = model_class().eval()
    gm, ctx = _captured(model, (torch.randn(2, 12, 32),))
    gm = PassManager([Canonicalize()]).run(gm, ctx)           # the manager recompiles the rewritten graph
    stats = ctx.pass_stats["canonicalize"]
    assert stats[source] == 1 and stats["near_misses"] == 0
    assert_graph(gm, expected)
    _assert_same(gm, model, (3, 29, 32), (1, 7, 32))


# -- fuse_heads ------------------------------------------------------------------------------

WINDOW = ("window", {"window": [5, 0]})
SINK_WINDOW = ("sink_window", {"sink": [2, 0], "window": [4, 0]})
INTERLEAVED = [WINDOW, SINK_WINDOW, WINDOW, SINK_WINDOW]      # heads 0, 2 window; 1, 3 sink_window
FUSED_GROUPS = ('[{"heads": [0, 1], "params": {"window": [5, 0]}, "pattern": "window"}, '
                '{"heads": [2, 3], "params": {"sink": [2, 0], "window": [4, 0]}, "pattern": "sink_window"}]')


class MultiHead(_Heads):
    """Four heads (one kv head each) through the canonical op, then an output projection."""

    def __init__(self):
        super().__init__(heads=4, kv_heads=4)
        self.o = nn.Linear(32, 32)

    def forward(self, x):
        q, k, v = self.project(x)
        y = torch.ops.sparsec.attention(q, k, v, None, self.head_dim ** -0.5, True)
        return self.o(y.transpose(1, 2).flatten(2))


class NoProjection(nn.Module):
    """Heads cut straight out of the input: no weight to permute, so heads are gathered."""

    def forward(self, x):
        b, n, _ = x.shape
        q = x.view(b, n, 4, 8).transpose(1, 2)
        return torch.ops.sparsec.attention(q, q.sin(), q, None, 0.5, True).sum(1)


def _planted(model: nn.Module) -> tuple[torch.fx.GraphModule, CompileContext]:
    """The model canonicalized, with the interleaved patterns planted on its one site."""
    gm, ctx = _captured(model, (torch.randn(2, 20, 32),))
    return PassManager([Canonicalize(), PlantPatterns([INTERLEAVED])]).run(gm, ctx), ctx


def _lowered(gm, ctx) -> torch.fx.GraphModule:
    return PassManager([Lower()]).run(gm, ctx)


def test_fuse_heads_permutes_weights_and_leaves_the_graph():
    """Heads [W, S, W, S] become [W, W, S, S] by permuting q/k/v rows and o columns: the graph
    is unchanged, the site runs as two contiguous groups."""
    torch.manual_seed(1)
    model = MultiHead().eval()
    gm, ctx = _planted(model)
    unfused_gm, unfused_ctx = copy.deepcopy(gm), copy.deepcopy(ctx)
    before = render(gm)
    PassManager([FuseHeads()]).run(gm, ctx)
    assert render(gm) == before
    order = [0, 2, 1, 3]
    rows = torch.cat([torch.arange(h * 8, (h + 1) * 8) for h in order])
    for name in ("q", "k", "v"):
        torch.testing.assert_close(getattr(gm, name).weight, getattr(model, name).weight[rows], rtol=0, atol=0)
    torch.testing.assert_close(gm.o.weight, model.o.weight[:, rows], rtol=0, atol=0)
    _assert_same(gm, model, (3, 29, 32))          # dense attention: the permutation is exact

    fused, unfused = _lowered(gm, ctx), _lowered(unfused_gm, unfused_ctx)
    [attention] = [n for n in fused.graph.nodes if n.target is torch.ops.sparsec.sparse_attention.default]
    assert attention.args[6] == FUSED_GROUPS
    _assert_same(fused, unfused, (3, 29, 32), (1, 9, 32))


# Where no weights can be permuted, fallback="gather" reorders q, k, v heads with
# index_select and puts the output heads back in the model's order.
GATHER_EXPECTED = """
    x = input
    view = aten.view.default(x, [x.size(0), x.size(1), 4, 8])
    transpose = aten.transpose.int(view, 1, 2)
    sin = aten.sin.default(transpose)
    _sparsec_attention_q_heads = self._sparsec_attention_q_heads
    index_select_default = aten.index_select.default(transpose, 1, _sparsec_attention_q_heads)
    _sparsec_attention_kv_heads = self._sparsec_attention_kv_heads
    index_select_default_1 = aten.index_select.default(sin, 1, _sparsec_attention_kv_heads)
    _sparsec_attention_kv_heads_1 = self._sparsec_attention_kv_heads
    index_select_default_2 = aten.index_select.default(transpose, 1, _sparsec_attention_kv_heads_1)
    attention = sparsec.attention.default(index_select_default, index_select_default_1, index_select_default_2, None, 0.5, True)
    _sparsec_attention_output_heads = self._sparsec_attention_output_heads
    index_select_default_3 = aten.index_select.default(attention, 1, _sparsec_attention_output_heads)
    sum_1 = aten.sum.dim_IntList(index_select_default_3, [1])
    return (sum_1,)
"""


def test_fuse_heads_gathers_heads_without_projections():
    torch.manual_seed(2)
    model = NoProjection().eval()
    gm, ctx = _planted(model)
    unfused_gm, unfused_ctx = copy.deepcopy(gm), copy.deepcopy(ctx)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        PassManager([FuseHeads(fallback="gather")]).run(gm, ctx)
    assert_graph(gm, GATHER_EXPECTED)
    assert gm._sparsec_attention_q_heads.tolist() == [0, 2, 1, 3]
    assert gm._sparsec_attention_kv_heads.tolist() == [0, 2, 1, 3]
    assert gm._sparsec_attention_output_heads.tolist() == [0, 2, 1, 3]   # its own inverse
    _assert_same(gm, model, (3, 29, 32))

    fused, unfused = _lowered(gm, ctx), _lowered(unfused_gm, unfused_ctx)
    [attention] = [n for n in fused.graph.nodes if n.target is torch.ops.sparsec.sparse_attention.default]
    assert attention.args[6] == FUSED_GROUPS
    _assert_same(fused, unfused, (3, 29, 32), (1, 9, 32))
