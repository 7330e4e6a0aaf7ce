"""canonicalize: every recognised attention becomes one sparsec.attention node, the rewritten
graph computes what the model computes (at other batch sizes and lengths too), and
attention-like subgraphs that cannot be rewritten are reported with a reason."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import TINY_MODELS
from sparsec.ir.errors import NoAttentionError
from sparsec.passes.infra.pass_manager import CompileContext, PassManager, PassResult
from sparsec.passes.helpers.attention_match import SOFTMAX
from sparsec.passes.helpers.attention_sites import attention_nodes
from sparsec.passes.canonicalize import Canonicalize
from sparsec.passes.helpers.capture import capture
from sparsec.ir.plan import Plan
from sparsec.ir.targets import get_target


class _KeepResult:
    """A pass instrument keeping the last pass's result."""

    result: PassResult | None = None

    def before_pass(self, name, gm, ctx) -> None:
        pass

    def after_pass(self, name, result, seconds, ctx) -> None:
        self.result = result


def _run(model, kwargs):
    """Canonicalize through the pass manager (which lints and recompiles the rewritten graph)."""
    gm, _record = capture(model, (), kwargs)
    ctx = CompileContext(plan=Plan(target="cpu"), target=get_target("cpu"), example_args=(),
                         example_kwargs=kwargs, calibration=[])
    kept = _KeepResult()
    gm = PassManager([Canonicalize()], instruments=(kept,)).run(gm, ctx)
    return gm, ctx, kept.result


def _first(output):
    return output if isinstance(output, torch.Tensor) else output[0]


def _assert_same(model, gm, kwargs, atol=2e-5, rtol=1e-5):
    with torch.no_grad():
        expected, actual = _first(model(**kwargs)), _first(gm(**kwargs))
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def _softmax_count(gm) -> int:
    return sum(n.op == "call_function" and n.target in SOFTMAX for n in gm.graph.nodes)


# -- Hugging Face models ------------------------------------------------------------------

HF_EXPECTED = {   # name -> (source, query heads, kv heads, site name of layer {i})
    "llama_gqa": ("sdpa", 4, 2, "model.layers.{i}.self_attn"),
    "llama_gqa_eager": ("eager", 4, 2, "model.layers.{i}.self_attn"),
    "bert_sdpa": ("sdpa", 4, 4, "encoder.layer.{i}.attention.self"),
    "bert_eager": ("eager", 4, 4, "encoder.layer.{i}.attention.self"),
    "gpt2": ("sdpa", 4, 4, "h.{i}.attn"),
    "gpt2_eager": ("eager", 4, 4, "h.{i}.attn"),
    "vit": ("sdpa", 4, 4, "layers.{i}.attention"),
}


@pytest.mark.parametrize("name", list(HF_EXPECTED))
def test_hf_model(name):
    build, make_inputs, dynamic_length = TINY_MODELS[name]
    source, heads, kv_heads, site_name = HF_EXPECTED[name]
    model, kwargs = build()
    gm, ctx, result = _run(model, kwargs)

    assert result.modified
    assert result.stats == {"attention_sites": 2, "sdpa": 2 * (source == "sdpa"),
                            "eager": 2 * (source == "eager"), "near_misses": 0}
    nodes = attention_nodes(gm)
    assert len(nodes) == 2 and _softmax_count(gm) == 0
    assert not any(n.target == torch.ops.aten.scaled_dot_product_attention.default for n in gm.graph.nodes)
    for node, site in zip(nodes, ctx.plan.attention):
        q, k, v = (arg.meta["val"] for arg in node.args[:3])
        assert (q.shape[1], k.shape[1], v.shape[1]) == (heads, kv_heads, kv_heads)   # GQA: k/v not repeated
        assert (site.num_heads, site.num_kv_heads, site.source) == (heads, kv_heads, source)
        assert site.has_mask and not site.causal        # HF builds its masks in the graph
        assert node.args[4] == pytest.approx(1 / math.sqrt(q.shape[-1]))
    assert [s.name for s in ctx.plan.attention] == [site_name.format(i=i) for i in range(2)]

    _assert_same(model, gm, kwargs)
    other = make_inputs(3, 29) if dynamic_length else make_inputs(3, 16)
    _assert_same(model, gm, other)


def test_llama_bf16_eager_matches_original():
    build, make_inputs, _ = TINY_MODELS["llama_gqa_eager"]
    model, kwargs = build()
    model = model.to(torch.bfloat16)
    gm, ctx, result = _run(model, kwargs)
    assert result.stats["eager"] == 2
    assert attention_nodes(gm)[0].args[0].meta["val"].dtype == torch.bfloat16
    _assert_same(model, gm, make_inputs(2, 33), atol=0.1, rtol=0.05)


# -- hand-written attention modules -------------------------------------------------------

class _Heads(nn.Module):
    """q/k/v/o projections of a [B, N, 32] input into ``heads`` query and ``kv_heads`` kv heads."""

    def __init__(self, heads=4, kv_heads=4, head_dim=8):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q = nn.Linear(32, heads * head_dim)
        self.k = nn.Linear(32, kv_heads * head_dim)
        self.v = nn.Linear(32, kv_heads * head_dim)
        self.o = nn.Linear(heads * head_dim, 32)

    def split(self, x, projection, heads):
        batch, length, _ = x.shape
        return projection(x).view(batch, length, heads, self.head_dim).transpose(1, 2)

    def merge(self, out):
        batch, _, length, _ = out.shape
        return self.o(out.transpose(1, 2).reshape(batch, length, -1))

    def repeat(self, kv, gqa):
        ratio = self.heads // self.kv_heads
        if gqa == "repeat_kv":       # Hugging Face's repeat_kv
            batch, kv_heads, length, dim = kv.shape
            return kv[:, :, None].expand(batch, kv_heads, ratio, length, dim).reshape(batch, -1, length, dim)
        if gqa == "repeat_interleave":
            return kv.repeat_interleave(ratio, dim=1)
        if gqa == "tile":            # query head h reads kv head h % Hkv
            return kv.repeat(1, ratio, 1, 1)
        return kv


class EagerAttention(_Heads):
    """softmax(mask(scale * q @ kᵀ)) @ v with every variant a constructor option."""

    def __init__(self, heads=4, kv_heads=4, gqa="repeat_kv", scale_on="scores", scale_op="mul",
                 mask="none", upcast="none", softmax_dim=-1, return_probs=False, key="transpose"):
        super().__init__(heads, kv_heads)
        self.gqa, self.scale_on, self.scale_op, self.mask = gqa, scale_on, scale_op, mask
        self.upcast, self.softmax_dim, self.return_probs, self.key = upcast, softmax_dim, return_probs, key
        self.dropout = nn.Dropout(0.1)
        self.temperature = nn.Parameter(torch.rand(1, heads, 1, 1) + 0.5)

    def _scaled(self, x, scale):
        if self.scale_op == "div":
            return x / math.sqrt(1 / scale ** 2)
        if self.scale_op == "tensor":
            return x / torch.tensor(1 / scale ** 2).sqrt()
        return x * scale

    def _masked(self, scores, padding):
        keep = padding[:, None, None, :].bool()
        if self.mask == "additive":
            return scores + (1.0 - padding[:, None, None, :].to(scores.dtype)) * torch.finfo(scores.dtype).min
        if self.mask == "masked_fill":
            return scores.masked_fill(~keep, float("-inf"))
        if self.mask == "where":
            return torch.where(keep, scores, float("-inf"))
        if self.mask == "where_flipped":
            return torch.where(~keep, torch.finfo(scores.dtype).min, scores)
        if self.mask == "causal":
            length = scores.shape[-1]
            causal = torch.ones(length, length, dtype=torch.bool, device=scores.device).tril()
            return scores.masked_fill(~causal, float("-inf"))
        if self.mask == "fill_zero":    # not a mask: near miss
            return scores.masked_fill(~keep, 0.0)
        return scores

    def forward(self, x, padding):
        q = self.split(x, self.q, self.heads)
        k = self.repeat(self.split(x, self.k, self.kv_heads), self.gqa)
        v = self.repeat(self.split(x, self.v, self.kv_heads), self.gqa)
        scale = self.head_dim ** -0.5
        if self.scale_on == "q":
            q = self._scaled(q, scale)
        if self.scale_on == "q_and_k":
            q, k = q * scale ** 0.5, k * scale ** 0.5
        if self.upcast == "inputs":      # attention computed in fp32 from low-precision q/k/v
            q, k, v = q.float(), k.float(), v.float()
        if self.key == "permute":       # k laid out [B, H, D, N] straight from the projection
            batch, length, _ = x.shape
            key_t = self.k(x).view(batch, length, self.kv_heads, self.head_dim).permute(0, 2, 3, 1)
        else:
            key_t = k.transpose(-1, -2)
        if self.key == "bmm3d":         # heads folded into the batch: near miss
            batch, heads, length, dim = q.shape
            scores = torch.bmm(q.reshape(-1, length, dim), key_t.reshape(-1, dim, length))
            scores = scores.view(batch, heads, length, length)
        else:
            scores = q @ key_t
        if self.scale_on == "scores":
            scores = self._scaled(scores, scale)
        if self.scale_on == "temperature":
            scores = scores * self.temperature
        scores = self._masked(scores, padding)
        if self.scale_on == "after_mask":
            scores = scores * scale
        if self.upcast == "softmax":
            probs = F.softmax(scores.float(), dim=self.softmax_dim).to(q.dtype)
        else:
            probs = scores.softmax(self.softmax_dim)
        out = self.merge((self.dropout(probs) @ v).to(x.dtype))
        return (out, probs) if self.return_probs else out


class SdpaAttention(_Heads):
    """F.scaled_dot_product_attention with its options."""

    def __init__(self, heads=4, kv_heads=4, gqa="repeat_kv", mask="none", is_causal=False, scale=None,
                 enable_gqa=False, dropout_p=0.0):
        super().__init__(heads, kv_heads)
        self.gqa, self.mask, self.is_causal, self.scale = gqa, mask, is_causal, scale
        self.enable_gqa, self.dropout_p = enable_gqa, dropout_p

    def forward(self, x, padding):
        q = self.split(x, self.q, self.heads)
        k, v = self.split(x, self.k, self.kv_heads), self.split(x, self.v, self.kv_heads)
        if not self.enable_gqa:
            k, v = self.repeat(k, self.gqa), self.repeat(v, self.gqa)
        mask = None
        if self.mask == "bool":
            mask = padding[:, None, None, :].bool()
        if self.mask == "additive":
            mask = (1.0 - padding[:, None, None, :].to(q.dtype)) * -1e9
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout_p,
                                             is_causal=self.is_causal, scale=self.scale,
                                             enable_gqa=self.enable_gqa)
        return self.merge(out)


class TwoAttentions(nn.Module):
    """One attention that matches followed by one that does not."""

    def __init__(self, second: nn.Module):
        super().__init__()
        self.first, self.second = EagerAttention(), second

    def forward(self, x, padding):
        return self.second(x + self.first(x, padding), padding)


def _inputs(batch, length, dtype=torch.float32):
    padding = torch.ones(batch, length, dtype=torch.long)
    for row in range(1, batch):
        padding[row, length - 2 * row:] = 0
    return {"x": torch.randn(batch, length, 32, dtype=dtype), "padding": padding}


EAGER_VARIANTS = {   # name -> (EagerAttention options, expected k/v heads, expected folds)
    "scale_mul_additive": (dict(mask="additive"), 4, ["scale", "additive mask"]),
    "scale_div_masked_fill": (dict(scale_op="div", mask="masked_fill"), 4, ["scale", "masked_fill"]),
    "scale_tensor_where": (dict(scale_op="tensor", mask="where"), 4, ["scale", "where"]),
    "scale_on_q_where_flipped": (dict(scale_on="q", mask="where_flipped"), 4, ["scale", "on q", "where"]),
    "scale_on_q_and_k_causal": (dict(scale_on="q_and_k", mask="causal"), 4, ["on q", "on k", "masked_fill"]),
    "scale_after_keep_mask": (dict(scale_on="after_mask", mask="masked_fill"), 4, ["scale", "masked_fill"]),
    "key_permute": (dict(key="permute", mask="additive"), 4, ["additive mask"]),
    "gqa_repeat_kv": (dict(kv_heads=2, mask="masked_fill"), 2, ["repeat_kv x2 stripped"]),
    "gqa_repeat_interleave": (dict(kv_heads=2, gqa="repeat_interleave"), 2, ["repeat_interleave x2 stripped"]),
    "mqa_repeat_interleave": (dict(kv_heads=1, gqa="repeat_interleave", scale_on="q", scale_op="div"), 1,
                              ["repeat_interleave x4 stripped"]),
    "gqa_tile_kept": (dict(kv_heads=2, gqa="tile", mask="additive"), 4, ["tiles heads", "kept repeated"]),
}


@pytest.mark.parametrize("variant", list(EAGER_VARIANTS))
def test_eager_variant(variant):
    options, kv_heads, folds = EAGER_VARIANTS[variant]
    torch.manual_seed(1)
    model = EagerAttention(**options).eval()
    gm, ctx, result = _run(model, _inputs(2, 24))

    assert result.stats == {"attention_sites": 1, "sdpa": 0, "eager": 1, "near_misses": 0}
    (node,) = attention_nodes(gm)
    assert _softmax_count(gm) == 0
    assert node.args[1].meta["val"].shape[1] == kv_heads == node.args[2].meta["val"].shape[1]
    assert node.args[4] == pytest.approx(8 ** -0.5)
    folded = " | ".join(result.decisions["sites"][0]["folded"])
    assert all(fold in folded for fold in folds), folded
    assert ctx.plan.attention[0].num_kv_heads == kv_heads

    for batch, length in ((3, 17), (1, 40)):
        _assert_same(model, gm, _inputs(batch, length))


@pytest.mark.parametrize("upcast", ["softmax", "inputs"])
def test_eager_fp32_upcast_in_bf16(upcast):
    torch.manual_seed(2)
    model = EagerAttention(kv_heads=2, upcast=upcast, mask="additive").eval().to(torch.bfloat16)
    gm, ctx, result = _run(model, _inputs(2, 24, torch.bfloat16))
    (node,) = attention_nodes(gm)
    folded = " | ".join(ctx.plan.attention[0].notes)
    assert "torch.float32 stripped" in folded and "repeat_kv x2 stripped" in folded, folded
    assert [arg.meta["val"].dtype for arg in node.args[:4]] == [torch.bfloat16] * 4
    assert node.args[1].meta["val"].shape[1] == 2
    _assert_same(model, gm, _inputs(3, 19, torch.bfloat16), atol=0.05, rtol=0.05)


SDPA_VARIANTS = {   # name -> (SdpaAttention options, expected k/v heads, causal)
    "plain_default_scale": (dict(), 4, False),
    "causal_scale": (dict(is_causal=True, scale=0.2), 4, True),
    "bool_mask": (dict(mask="bool"), 4, False),
    "additive_mask_gqa_repeat_kv": (dict(kv_heads=2, mask="additive"), 2, False),
    "enable_gqa_causal": (dict(kv_heads=2, enable_gqa=True, is_causal=True), 2, True),
    "gqa_repeat_interleave": (dict(kv_heads=2, gqa="repeat_interleave", mask="bool"), 2, False),
    "gqa_tile_kept": (dict(kv_heads=2, gqa="tile"), 4, False),
}


@pytest.mark.parametrize("variant", list(SDPA_VARIANTS))
def test_sdpa_variant(variant):
    options, kv_heads, causal = SDPA_VARIANTS[variant]
    torch.manual_seed(3)
    model = SdpaAttention(**options).eval()
    gm, ctx, result = _run(model, _inputs(2, 24))

    assert result.stats == {"attention_sites": 1, "sdpa": 1, "eager": 0, "near_misses": 0}
    (node,) = attention_nodes(gm)
    assert node.args[1].meta["val"].shape[1] == kv_heads
    assert node.args[4] == pytest.approx(options.get("scale") or 8 ** -0.5)
    assert node.args[5] is causal and ctx.plan.attention[0].causal is causal
    assert (node.args[3] is None) is (options.get("mask", "none") == "none")
    for batch, length in ((2, 24), (3, 33)):
        _assert_same(model, gm, _inputs(batch, length))


NEAR_MISSES = {   # name -> (second attention, words of the reason)
    "softmax_over_queries": (EagerAttention(softmax_dim=-2), "softmax over dim"),
    "probabilities_returned": (EagerAttention(return_probs=True), "2 users"),
    "scale_after_mask": (EagerAttention(scale_on="after_mask", mask="additive"), "after the additive mask"),
    "fill_value_not_masking": (EagerAttention(mask="fill_zero"), "does not mask"),
    "learned_temperature": (EagerAttention(scale_on="temperature"), "not from a scaled and masked"),
    "heads_in_batch": (EagerAttention(key="bmm3d"), "comes from view"),
}


@pytest.mark.parametrize("name", list(NEAR_MISSES))
def test_near_miss_is_reported_and_still_runs(name):
    second, reason = NEAR_MISSES[name]
    torch.manual_seed(4)
    model = TwoAttentions(second).eval()
    gm, ctx, result = _run(model, _inputs(2, 20))

    assert result.stats["attention_sites"] == 1 and result.stats["near_misses"] == 1
    (miss,) = ctx.plan.unmatched
    assert reason in miss["reason"], miss
    assert miss["module"] == "second" and miss["node"]
    _assert_same(model, gm, _inputs(3, 23))


def test_sdpa_with_active_dropout_is_a_near_miss():
    gm, ctx, result = _run(TwoAttentions(SdpaAttention(dropout_p=0.1)).eval(), _inputs(2, 20))
    assert result.stats["near_misses"] == 1 and "dropout_p=0.1" in ctx.plan.unmatched[0]["reason"]
    assert len(attention_nodes(gm)) == 1
    assert any(n.target == torch.ops.aten.scaled_dot_product_attention.default for n in gm.graph.nodes)


class TorchMultiheadAttention(nn.Module):
    def __init__(self, need_weights: bool):
        super().__init__()
        self.attention, self.need_weights = nn.MultiheadAttention(32, 4, batch_first=True), need_weights

    def forward(self, x, padding):
        return self.attention(x, x, x, need_weights=self.need_weights)[0]


def test_torch_multihead_attention():
    model = TorchMultiheadAttention(need_weights=False).eval()
    gm, ctx, result = _run(model, _inputs(2, 20))
    assert result.stats["sdpa"] == 1 and ctx.plan.attention[0].name == "attention"
    _assert_same(model, gm, _inputs(3, 11))
    # need_weights=True returns the averaged probabilities: a near miss that says so, and
    # the model stays dense (a warning, not an error: one unrecognised site must not fail it)
    with pytest.warns(UserWarning, match="have 2 users"):
        _gm, ctx, result = _run(TorchMultiheadAttention(need_weights=True).eval(), _inputs(2, 20))
    assert ctx.plan.attention == [] and result.stats["near_misses"] == 1
    assert "have 2 users" in ctx.plan.unmatched[0]["reason"]


def test_near_miss_only_warns_naming_it_and_stays_dense():
    model = EagerAttention(softmax_dim=-2).eval()
    with pytest.warns(UserWarning, match="softmax over dim"):
        gm, ctx, _result = _run(model, _inputs(2, 20))
    assert ctx.plan.attention == [] and "softmax over dim" in ctx.plan.unmatched[0]["reason"]
    _assert_same(model, gm, _inputs(3, 11))


class SoftmaxClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(32, 5)

    def forward(self, x, padding):
        return self.linear(x).softmax(-1)


def test_no_attention_raises_without_near_misses():
    gm, _record = capture(SoftmaxClassifier().eval(), (), _inputs(2, 20))
    ctx = CompileContext(plan=Plan(target="cpu"), target=get_target("cpu"), example_args=(),
                         example_kwargs=_inputs(2, 20), calibration=[])
    with pytest.raises(NoAttentionError, match="no attention found"):
        Canonicalize().run(gm, ctx)
    assert ctx.plan.unmatched == []     # a classifier softmax is not attention-like


def test_second_run_keeps_canonical_nodes():
    model = SdpaAttention(kv_heads=2).eval()
    gm, ctx, _ = _run(model, _inputs(2, 24))
    again = Canonicalize().run(gm, ctx)
    assert not again.modified
    assert again.stats == {"attention_sites": 1, "sdpa": 0, "eager": 0, "near_misses": 0}
    assert ctx.plan.attention[0].source == "sparsec.attention"
