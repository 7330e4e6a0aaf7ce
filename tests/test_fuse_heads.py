"""fuse_heads: grouping, head order, weight permutation, fallbacks; fused model == unfused model."""
import copy
import json
import warnings

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import sparsec
from sparsec.passes.infra.pass_manager import CompileContext, PassManager
from sparsec.passes.apply_plan import ApplyPlan
from sparsec.passes.helpers.attention_sites import ATTENTION, SPARSE_ATTENTION, attention_nodes
from sparsec.passes.canonicalize import Canonicalize
from sparsec.testing.plant_patterns import PlantPatterns
from sparsec.passes.helpers.capture import capture
from sparsec.passes.fuse_heads import FuseHeads, arrange_heads, count_runs
from sparsec.passes.helpers.head_grouping import covering
from sparsec.patterns import canonical_params, instance_key
from sparsec.passes.lower import Lower
from sparsec.ir.plan import HeadPlan, Plan, decode_groups, group_heads
from sparsec.ir.targets import Target, get_target, register_target

from models import TINY_MODELS, llama_inputs

W5 = ("window", {"window": [5, 0]})
W8 = ("window", {"window": [8, 0]})
SINK = ("sink_window", {"sink": [2, 0], "window": [4, 0]})
STRIPE = ("vertical_stripe", {"columns": [0, 7], "window": [3, 0]})
DIAG = ("multi_diagonal", {"period": [6, 0], "width": [1, 0], "count": 0})
BLOCK = ("block_topk", {"block": 8, "grid": [3, 3], "blocks": [[0, 0], [1, 0], [2, 1]]})
SLASH = ("vertical_slash", {"vertical": [3, 0], "slash": [2, 0], "queries": 4})
DENSE = ("dense", {})
DISTINCT = [W5, W8, SINK, STRIPE, DIAG, BLOCK, SLASH, DENSE]


# -- models ------------------------------------------------------------------------------------

def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaStyleAttention(torch.nn.Module):
    """q/k/v/o linears, RoPE, GQA; optionally an ALiBi-style per-head additive mask."""

    def __init__(self, dim, heads, kv_heads, head_dim, bias, alibi):
        super().__init__()
        self.heads, self.head_dim, self.alibi = heads, head_dim, alibi
        self.q_proj = torch.nn.Linear(dim, heads * head_dim, bias=bias)
        self.k_proj = torch.nn.Linear(dim, kv_heads * head_dim, bias=bias)
        self.v_proj = torch.nn.Linear(dim, kv_heads * head_dim, bias=bias)
        self.o_proj = torch.nn.Linear(heads * head_dim, dim, bias=bias)
        self.register_buffer("slopes", torch.rand(heads) + 0.1)

    def forward(self, x, cos, sin):
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, -1, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        mask = None
        if self.alibi:
            position = torch.arange(n, device=x.device, dtype=x.dtype)
            mask = -self.slopes[None, :, None, None] * (position[:, None] - position[None, :]).abs()
        y = torch.ops.sparsec.attention(q, k, v, mask, self.head_dim ** -0.5, True)
        return self.o_proj(y.transpose(1, 2).reshape(b, n, -1))


class LlamaStyle(torch.nn.Module):
    def __init__(self, layers=2, heads=8, kv_heads=2, head_dim=8, dim=32, bias=False, alibi=False,
                 shared=False):
        super().__init__()
        self.head_dim = head_dim
        first = LlamaStyleAttention(dim, heads, kv_heads, head_dim, bias, alibi)
        self.layers = torch.nn.ModuleList(
            [first if shared else LlamaStyleAttention(dim, heads, kv_heads, head_dim, bias, alibi)
             for _ in range(layers - 1)] + [first])

    def forward(self, x):
        n = x.shape[1]
        inverse = 1.0 / (10000 ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))
        angles = torch.arange(n, dtype=torch.float32)[:, None] * inverse[None]
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos()[None, None], angles.sin()[None, None]
        for layer in self.layers:
            x = x + layer(x, cos, sin)
        return x


class PackedQKV(torch.nn.Module):
    """One linear makes q, k and v: ``view(b, n, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)``."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        y = torch.ops.sparsec.attention(q, k, v, None, self.head_dim ** -0.5, False)
        return self.out(y.permute(0, 2, 1, 3).flatten(2))


class NoProjection(torch.nn.Module):
    """Heads cut straight out of the input: no parameter to permute."""

    def __init__(self, heads=8, kv_heads=2):
        super().__init__()
        self.heads, self.kv_heads = heads, kv_heads

    def forward(self, x):
        b, n, d = x.shape
        q = x.view(b, n, self.heads, -1).transpose(1, 2)
        kv = x[..., : d * self.kv_heads // self.heads].reshape(b, n, self.kv_heads, -1).transpose(1, 2)
        return torch.ops.sparsec.attention(q, kv.sin(), kv, None, 0.5, True).sum(1)


# -- helpers -----------------------------------------------------------------------------------

def _run(gm, record, args, kwargs, passes, target="cpu"):
    target = get_target(target)
    ctx = CompileContext(plan=Plan(target=target.name, capture=record), target=target,
                         example_args=args, example_kwargs=kwargs, calibration=[])
    return PassManager(passes).run(gm, ctx), ctx


def fused_and_unfused(model, args=(), kwargs=None, layers=(), **options):
    """Capture once; run the pipeline with and without ``FuseHeads(**options)``."""
    kwargs = kwargs or {}
    gm, record = capture(model, args, kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unfused_gm = copy.deepcopy(gm)
    fused, ctx = _run(gm, record, args, kwargs, [Canonicalize(), PlantPatterns(layers), FuseHeads(**options), Lower()])
    unfused, _ = _run(unfused_gm, record, args, kwargs, [Canonicalize(), PlantPatterns(layers), Lower()])
    return fused, unfused, ctx


def _tensor(output):
    return output if isinstance(output, torch.Tensor) else output[0]


def assert_same_outputs(fused, unfused, *calls):
    with torch.no_grad():
        for args, kwargs in calls:
            torch.testing.assert_close(_tensor(fused(*args, **kwargs)), _tensor(unfused(*args, **kwargs)),
                                       rtol=1e-5, atol=1e-5)


def assert_contiguous(groups):
    for group in groups:
        assert group.heads == list(range(group.heads[0], group.heads[-1] + 1)), group


def assert_one_call_per_site(gm, ctx):
    """Every sparse site is one sparse_attention call whose table is the site's groups."""
    sparse = attention_nodes(gm, SPARSE_ATTENTION)
    sites = [s for s in ctx.plan.attention if any(h.pattern != "dense" for h in s.heads)]
    assert len(sparse) == len(sites)
    for node, site in zip(sparse, sites):
        assert decode_groups(node.args[6]) == site.groups


# -- Llama-style (hand-written) ------------------------------------------------------------------

GQA_MIXED = [W5, SINK, W5, SINK, SINK, W5, STRIPE, STRIPE]          # every KV unit mixes patterns


@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (8, 1), (16, 2), (8, 8)])
def test_llama_style_fused_equals_unfused(heads, kv_heads):
    """Three layers: heads split across KV units, all heads distinct, all heads shared."""
    torch.manual_seed(heads + kv_heads)
    mixed = (GQA_MIXED * 2)[:heads]
    distinct = DISTINCT + [("window", {"window": [10 + i, 0]}) for i in range(heads - len(DISTINCT))]
    model = LlamaStyle(layers=3, heads=heads, kv_heads=kv_heads, bias=True).eval()
    fused, unfused, ctx = fused_and_unfused(model, (torch.randn(2, 20, 32),), layers=[mixed, distinct, [W5] * heads])
    assert_same_outputs(fused, unfused, ((torch.randn(3, 37, 32),), {}), ((torch.randn(2, 9, 32),), {}))
    stats = ctx.pass_stats["fuse_heads"]
    assert stats["launches_before"] == [heads, heads, heads]
    assert stats["launches_after"][1:] == [heads, 1]
    assert stats["sites_weights"] == 1 and stats["sites_none"] == 2
    mixed_site = ctx.plan.attention[0]
    per_kv = heads // kv_heads
    assert stats["launches_after"][0] == 3              # one launch per pattern
    # Any order is realisable when there is one KV head or one query head per KV head;
    # otherwise KV units mix patterns and some group keeps scattered heads.
    assert (stats["groups_split_by_gqa"] > 0) == (1 < per_kv < heads)
    assert mixed_site.fusion.strategy == "weights"
    if not stats["groups_split_by_gqa"]:
        assert_contiguous(mixed_site.groups)
    assert_one_call_per_site(fused, ctx)
    order = mixed_site.fusion.head_permutation
    for unit in range(kv_heads):      # KV heads moved as units with their query heads
        assert len({h // per_kv for h in order[unit * per_kv:(unit + 1) * per_kv]}) == 1
    assert [h.pattern for h in mixed_site.heads] == [mixed[h][0] for h in order]


def test_gqa_split_into_contiguous_subgroups():
    torch.manual_seed(1)
    model = LlamaStyle(layers=1, heads=8, kv_heads=2).eval()
    fused, unfused, ctx = fused_and_unfused(model, (torch.randn(2, 20, 32),), layers=[GQA_MIXED],
                                            gqa_split="subgroups")
    assert_same_outputs(fused, unfused, ((torch.randn(3, 29, 32),), {}))
    site = ctx.plan.attention[0]
    assert ctx.pass_stats["fuse_heads"]["groups_split_by_gqa"] >= 1
    assert ctx.pass_stats["fuse_heads"]["launches_after"] == [4]      # see test_arrange_heads_keeps_kv_units
    assert site.fusion.gqa_split == "subgroups"
    assert_contiguous(site.groups)
    assert sorted(h for g in site.groups for h in g.heads) == list(range(8))


def test_packed_qkv_projection():
    torch.manual_seed(3)
    layers = [[W5, SINK, W5, SINK]]
    fused, unfused, ctx = fused_and_unfused(PackedQKV().eval(), (torch.randn(2, 20, 32),), layers=layers)
    record = ctx.pass_stats["fuse_heads"]
    assert record["sites_weights"] == 1 and record["launches_after"] == [2]
    permuted = ctx.plan.attention[0].fusion.permuted_parameters
    assert {target: p["axis"] for target, p in permuted.items()} == {"qkv.weight": 0, "qkv.bias": 0, "out.weight": 1}
    for target, p in permuted.items():         # the recorded index is how the parameter was permuted
        original = unfused.get_parameter(target).detach()
        assert torch.equal(fused.get_parameter(target), original.index_select(p["axis"], torch.tensor(p["index"])))
    assert sorted(permuted["out.weight"]["index"]) == list(range(32)) and permuted["out.weight"]["index"] != list(range(32))
    assert_same_outputs(fused, unfused, ((torch.randn(3, 25, 32),), {}))


# -- fallbacks -----------------------------------------------------------------------------------

@pytest.mark.parametrize("fallback", ["head_index", "gather"])
def test_fallback_without_projections(fallback):
    torch.manual_seed(4)
    fused, unfused, ctx = fused_and_unfused(NoProjection().eval(), (torch.randn(2, 20, 32),),
                                            layers=[GQA_MIXED], fallback=fallback, gqa_split="subgroups")
    site = ctx.plan.attention[0]
    assert site.fusion.strategy == fallback
    assert site.fusion.reason.startswith("weights not permuted")
    gathers = sum(n.target is torch.ops.aten.index_select.default for n in fused.graph.nodes)
    if fallback == "gather":                             # q, the output, and k, v if KV heads move
        kv_moved = site.fusion.kv_head_permutation != [0, 1]
        assert gathers == 2 + 2 * kv_moved
        assert_contiguous(site.groups)
    else:
        assert gathers == 0
        assert ctx.pass_stats["fuse_heads"]["launches_after"] == [3]    # one launch per pattern
        assert site.fusion.head_permutation == list(range(8))
    assert_same_outputs(fused, unfused, ((torch.randn(3, 26, 32),), {}))


def test_shared_weights_fall_back():
    torch.manual_seed(5)
    model = LlamaStyle(layers=2, shared=True).eval()
    fused, unfused, ctx = fused_and_unfused(model, (torch.randn(2, 20, 32),), layers=[GQA_MIXED])
    for site in ctx.plan.attention:
        assert site.fusion.strategy == "head_index"
        assert "outside this attention" in site.fusion.reason or \
            "shared" in site.fusion.reason
    assert_same_outputs(fused, unfused, ((torch.randn(2, 23, 32),), {}))


# -- merging -----------------------------------------------------------------------------------

# A CPU-class target scaled from the h100 calibration: launches cost about as much as a few
# pairs, so merging trades them (the measured cpu profile has free sparse launches).
SLOW_LAUNCHES = register_target(Target("test-slow-launches", "cpu", "cpu", peak_tflops=0.2, bandwidth_gbs=20.0,
                                       launch_overhead_us=5.0))


def test_merge_into_covering_pattern():
    torch.manual_seed(6)
    model = LlamaStyle(layers=1, heads=8, kv_heads=8).eval()
    planted = [W5, W8, W5, W8, DIAG, DENSE, DIAG, DENSE]
    gm, record = capture(model, (torch.randn(2, 20, 32),), {})
    fused, ctx = _run(gm, record, (torch.randn(2, 20, 32),), {},
                      [Canonicalize(), PlantPatterns([planted]), FuseHeads(merge_threshold=0.0), Lower()],
                      SLOW_LAUNCHES)
    site = ctx.plan.attention[0]
    # window 5 runs as window 8 (a launch saved for a few pairs); the others stay apart.
    assert [(g.pattern, g.params) for g in site.groups] == [W8, DIAG, DENSE]
    assert ctx.pass_stats["fuse_heads"]["groups_merged"] == 1
    assert "was window {'window': [5, 0]}" in site.heads[0].reason
    covered = [W8 if p == W5 else p for p in planted]
    gm, record = capture(model, (torch.randn(2, 20, 32),), {})
    reference, _ = _run(gm, record, (torch.randn(2, 20, 32),), {},
                        [Canonicalize(), PlantPatterns([covered]), Lower()])
    assert_same_outputs(fused, reference, ((torch.randn(2, 33, 32),), {}))

    gm, record = capture(model, (torch.randn(2, 20, 32),), {})
    bounded, ctx = _run(gm, record, (torch.randn(2, 20, 32),), {},
                        [Canonicalize(), PlantPatterns([planted]), FuseHeads(max_groups_per_layer=1), Lower()])
    assert ctx.pass_stats["fuse_heads"]["launches_after"] == [1]
    assert ctx.plan.attention[0].groups[0].pattern == "dense"


def test_instances_and_covers():
    assert instance_key("window", {"window": [5, 0]}) == instance_key("window", {"window": [5.2, 0.0]})
    assert instance_key("window", {"window": 5}) == instance_key("window", {"window": [5, 0]})
    assert instance_key("window", {"window": [5, 0.01]}) != instance_key("window", {"window": [5, 0]})
    assert canonical_params("vertical_stripe", {"columns": [7, 0, 7], "window": [3.0, 0]}) == {"columns": [0, 7], "window": [3, 0]}
    assert covering(*W5, *SINK) == ("sink_window", {"sink": [2, 0], "window": [5, 0]})
    assert covering(*SINK, *STRIPE) == ("vertical_stripe", {"columns": [0, 1, 7], "window": [4, 0]})
    assert covering(*W5, *DIAG) == ("dense", {})
    assert covering("skip", {}, *W8) == W8
    heads = [HeadPlan(0, *W5), HeadPlan(1, "window", {"window": [5.0, 0.0]}), HeadPlan(2, *SINK)]
    assert [g.heads for g in group_heads(heads)] == [[0, 1], [2]]


@pytest.mark.parametrize("group_of,per_kv,runs", [
    ([0, 1, 0, 1, 1, 0, 2, 2], 4, 4),
    ([0, 0, 0, 1, 1, 2, 2, 2, 1, 0, 2, 0], 3, 4),
    ([0, 1, 2, 3, 3, 2, 1, 0], 1, 4),
    ([0, 0, 1, 1, 0, 0, 1, 1], 2, 2),
])
def test_arrange_heads_keeps_kv_units(group_of, per_kv, runs):
    order = arrange_heads(group_of, per_kv)
    assert sorted(order) == list(range(len(group_of)))
    for unit in range(len(group_of) // per_kv):
        assert len({h // per_kv for h in order[unit * per_kv:(unit + 1) * per_kv]}) == 1
    assert count_runs(order, group_of) == runs


# -- Hugging Face models ---------------------------------------------------------------------------

def _hf_llama(heads, kv_heads):
    torch.manual_seed(7)
    config = LlamaConfig(vocab_size=128, hidden_size=8 * heads, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128,
                         use_cache=False, attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval(), llama_inputs(2, 24)


@pytest.mark.parametrize("name", ["llama_4to1", "llama_8to1", "bert_sdpa", "gpt2", "vit"])
def test_hugging_face_models(name):
    if name.startswith("llama"):
        model, example = _hf_llama(8, 2 if name == "llama_4to1" else 1)
        inputs, layers = llama_inputs, [GQA_MIXED]
    else:
        build, inputs, _ = TINY_MODELS[name]
        model, example = build()
        layers = [[W5, SINK, W5, SINK], [SINK, SINK, W5, SINK]]
    fused, unfused, ctx = fused_and_unfused(model, kwargs=example, layers=layers)
    stats = ctx.pass_stats["fuse_heads"]
    assert stats["sites_weights"] >= 1 and stats["sites_head_index"] == stats["sites_gather"] == 0
    assert all(after < before for before, after in zip(stats["launches_before"], stats["launches_after"]))
    if not stats["groups_split_by_gqa"]:
        for site in ctx.plan.attention:
            assert_contiguous(site.groups)
    assert_one_call_per_site(fused, ctx)
    other = inputs(3, 16 if name == "vit" else 29)
    assert_same_outputs(fused, unfused, ((), other))


# -- end to end: compile, save/load, dumps, re-applying a permuted plan -----------------------------

def test_compile_save_load_and_dump(tmp_path):
    torch.manual_seed(8)
    model = LlamaStyle(layers=2, heads=8, kv_heads=2, bias=True, alibi=True).eval()   # per-head mask
    original = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 20, 32)
    passes = [Canonicalize(), PlantPatterns([GQA_MIXED]), FuseHeads(), Lower()]
    cm = sparsec.compile(model, (x,), passes=passes, dump_dir=tmp_path / "dump")
    for key, tensor in model.state_dict().items():          # the user's model is untouched
        torch.testing.assert_close(tensor, original[key], rtol=0, atol=0)
    assert not torch.equal(cm.graph_module.state_dict()["layers.0.q_proj.weight"], original["layers.0.q_proj.weight"])
    # The per-head mask moves with the heads: one index_select per site.
    assert sum(n.target is torch.ops.aten.index_select.default for n in cm.graph_module.graph.nodes) == 2

    loaded = sparsec.load(cm.save(tmp_path / "artifact"))
    y = torch.randn(3, 41, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(y), cm(y), rtol=1e-6, atol=1e-6)
    assert loaded.plan.attention[0].fusion.head_permutation == cm.plan.attention[0].fusion.head_permutation

    dumps = sorted(p.name for p in (tmp_path / "dump").iterdir())
    before = next(p for p in dumps if p.endswith("plant_patterns.py"))
    after = next(p for p in dumps if p.endswith("fuse_heads.json"))
    assert before and after.replace(".json", ".py") in dumps
    decisions = json.loads((tmp_path / "dump" / after).read_text())["decisions"]
    site = decisions["layers.0"]
    assert site["strategy"] == "weights" and site["groups"] and site["head_permutation"]

    # The plan re-applied to the unpermuted model: heads map back to the model's numbering;
    # without fuse_heads it is the unfused model.
    again = sparsec.compile(model, (x,), passes=[Canonicalize(), ApplyPlan(cm.plan), FuseHeads(), Lower()])
    plain = sparsec.compile(model, (x,), passes=[Canonicalize(), ApplyPlan(cm.plan), Lower()])
    with torch.no_grad():
        torch.testing.assert_close(again(y), cm(y), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(plain(y), cm(y), rtol=1e-5, atol=1e-5)


def test_dense_sites_untouched():
    torch.manual_seed(9)
    model = LlamaStyle(layers=1).eval()
    fused, unfused, ctx = fused_and_unfused(model, (torch.randn(2, 20, 32),), layers=[[DENSE] * 8])
    stats = ctx.pass_stats["fuse_heads"]
    assert stats["launches_before"] == stats["launches_after"] == [1] and stats["sites_none"] == 1
    assert len(attention_nodes(fused, ATTENTION)) == 1
    assert_same_outputs(fused, unfused, ((torch.randn(2, 21, 32),), {}))
