"""Weight sparsity: structures and masks, scores, OWL allocation, compressed
storage, the sparsify_weights pass, the sparse_linear op and its kernels."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import sparsec  # noqa: F401  (registers the ops)
from sparsec.analysis.graph_runner import GraphRunner
from sparsec.analysis.linear_sensitivity import LINEAR, LinearAnalysis, output_error
from sparsec.passes.infra.pass_manager import CompileContext, PassManager
from sparsec.passes.helpers.capture import capture
from sparsec.passes import sparsify_weights
from sparsec.passes.sparsify_weights import SPARSE_LINEAR, SparsifyWeights, analyze_linears
from sparsec.ir.plan import LinearPlan, Plan
from sparsec.analysis import linear_costs
from sparsec.runtime import sparse_linear_gpu
from sparsec.ir.targets import get_target
from sparsec.weights import (Layout, block_csr, compress, decompress, outlier_ratio, owl_levels, parse_structure,
                             round_levels, score_weight)
from sparsec.weights.config import WeightSparsity

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _shape_for(structure: str) -> tuple[int, int]:
    """An awkward shape each structure still fits (not a power of two)."""
    return {"2:4": (37, 100), "4:8": (45, 168), "block32": (96, 160), "block64": (192, 320)}.get(structure, (37, 51))


# -- structures and masks --

@pytest.mark.parametrize("structure", ["2:4", "4:8", "unstructured", "block32", "block64"])
@pytest.mark.parametrize("group", ["row", "layer"])
def test_masks_respect_structure_and_level(structure, group):
    parsed = parse_structure(structure)
    out_features, in_features = _shape_for(structure)
    scores = torch.rand(out_features, in_features)
    for level in parsed.levels()[1:]:
        keep = parsed.mask(scores, level, group)
        assert keep.shape == scores.shape and keep.dtype == torch.bool
        realised = 1 - keep.double().mean().item()
        if parsed.kind == "n:m":
            per_group = keep.reshape(out_features, -1, parsed.m).sum(-1)
            assert int(per_group.max()) <= parsed.n
            assert torch.all(per_group == round((1 - level) * parsed.m))      # exact per group
            assert realised == pytest.approx(level, abs=1e-9)
        elif parsed.kind == "block":
            b = parsed.block
            tiles = keep.reshape(out_features // b, b, in_features // b, b).permute(0, 2, 1, 3)
            assert torch.equal(tiles.all(dim=(2, 3)), tiles.any(dim=(2, 3)))   # whole tiles only
            units = in_features // b if group == "row" else keep.numel() // b // b
            assert abs(realised - level) <= 0.5 / units + 1e-6
        else:
            units = in_features if group == "row" else keep.numel()
            assert abs(realised - level) <= 0.5 / units + 1e-6
        # the highest-scored entries survive
        if parsed.kind == "unstructured" and group == "row":
            assert keep[torch.arange(out_features), scores.argmax(1)].all()


def test_structure_parsing_and_fit():
    assert str(parse_structure("2:4")) == "2:4" and str(parse_structure("block64")) == "block64"
    assert parse_structure("2:4").levels() == [0.0, 0.5, 0.75]
    assert parse_structure("2:4").misfit(64, 30) is not None
    assert parse_structure("block32").misfit(96, 100) is not None
    assert parse_structure("block32").misfit(96, 64) is None
    assert parse_structure("2:4").nearest_level(0.55) == 0.5
    for bad in ("3:2", "block0", "dense", "2-4"):
        with pytest.raises(ValueError):
            parse_structure(bad)
    with pytest.raises(ValueError):
        parse_structure("2:4").mask(torch.rand(8, 8), 0.25)   # 3 of 4 kept is not 2:4


# -- scores and allocation --

def test_wanda_scores_weight_by_input_norm():
    weight = torch.randn(6, 10)
    sq_norm = torch.rand(10) * 4
    scores = score_weight(weight, "wanda", sq_norm)
    torch.testing.assert_close(scores, weight.abs() * sq_norm.sqrt()[None, :])
    torch.testing.assert_close(score_weight(weight, "magnitude"), weight.abs())
    with pytest.raises(ValueError):
        score_weight(weight, "wanda")
    with pytest.raises(ValueError):
        score_weight(weight, "taylor", sq_norm)


def test_owl_gives_outlier_heavy_layers_less_sparsity_at_the_target_mean():
    torch.manual_seed(0)
    plain = torch.rand(64, 64)
    heavy = plain.clone()
    heavy.view(-1)[torch.randperm(heavy.numel())[:200]] *= 50      # planted outliers
    ratios = [outlier_ratio(s) for s in (plain, heavy, plain * 2)]
    assert ratios[1] > ratios[0] == ratios[2]
    sizes = [4096, 4096, 8192]
    structure = parse_structure("unstructured")
    levels = owl_levels(ratios, sizes, 0.6, structure, lam=0.08)
    assert levels[1] < levels[0] == pytest.approx(levels[2])
    assert sum(l * s for l, s in zip(levels, sizes)) / sum(sizes) == pytest.approx(0.6, abs=1e-9)
    assert max(levels) - min(levels) == pytest.approx(0.16, abs=1e-9)
    # clipping at the top still keeps the mean
    clipped = owl_levels([0.0, 0.5, 1.0], [1, 1, 1], 0.9, structure, lam=0.2)
    assert max(clipped) <= structure.max_level + 1e-12
    assert sum(clipped) / 3 == pytest.approx(0.9, abs=1e-9)
    assert owl_levels([0.3, 0.3], [1, 5], 0.5, structure) == pytest.approx([0.5, 0.5])


def test_round_levels_to_n_m_keeps_the_global_count():
    structure = parse_structure("4:8")
    sizes = [100, 100, 100, 100]
    levels = round_levels([0.45, 0.55, 0.6, 0.4], sizes, 0.5, structure)
    assert set(levels) <= set(structure.levels())
    assert sum(levels) / 4 == pytest.approx(0.5, abs=0.125 / 2)


# -- compressed storage --

@pytest.mark.parametrize("structure", ["2:4", "4:8", "unstructured", "block32", "block64"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_storage_round_trip_and_size(structure, dtype):
    parsed = parse_structure(structure)
    out_features, in_features = _shape_for(structure)
    weight = torch.randn(out_features, in_features).to(dtype)
    keep = parsed.mask(torch.rand(out_features, in_features), 0.5, "row")
    values, mask, layout = compress(weight, keep, parsed)
    assert mask.dtype == torch.uint8 and values.dtype == dtype
    assert torch.equal(decompress(values, mask, layout), weight * keep)
    dense_bytes = weight.numel() * weight.element_size()
    assert values.numel() * values.element_size() + mask.numel() < 0.6 * dense_bytes + 16
    if parsed.kind == "block":
        b = parsed.block
        crow, col = block_csr(mask, layout)
        assert values.numel() == int(crow[-1]) * b * b and len(col) == int(crow[-1])
        tiles = values.reshape(-1, b, b)
        for row in range(out_features // b):
            for index in range(int(crow[row]), int(crow[row + 1])):
                c = int(col[index])
                assert torch.equal(tiles[index], weight[row * b:(row + 1) * b, c * b:(c + 1) * b])


def test_compress_rejects_partial_tiles():
    keep = torch.ones(64, 64, dtype=torch.bool)
    keep[3, 5] = False
    with pytest.raises(ValueError, match="whole"):
        compress(torch.randn(64, 64), keep, "block32")


@pytest.mark.parametrize("shape", [(2, 5, 100), (7, 100), (1, 100)])
def test_sparse_linear_op_equals_masked_dense(shape):
    weight, bias = torch.randn(36, 100), torch.randn(36)
    keep = parse_structure("2:4").mask(weight.abs(), 0.5)
    values, mask, layout = compress(weight, keep, "2:4")
    x = torch.randn(shape)
    out = torch.ops.sparsec.sparse_linear(x, values, mask, bias, layout.encode())
    torch.testing.assert_close(out, F.linear(x, weight * keep, bias))


# -- the pass --

class _TinyClassifier(torch.nn.Module):
    """Three hidden linears (one without bias) and a classifier head."""

    def __init__(self, width: int = 128):
        super().__init__()
        self.up = torch.nn.Linear(64, width)
        self.mid = torch.nn.Linear(width, width, bias=False)
        self.down = torch.nn.Linear(width, 64)
        self.classifier = torch.nn.Linear(64, 10)

    def forward(self, x):
        h = torch.relu(self.up(x))
        h = torch.relu(self.mid(h)) + h
        return self.classifier(self.down(h))


def _context(weights: WeightSparsity | None, example: tuple, batches: int = 3, seed: int = 1,
             make=None) -> CompileContext:
    torch.manual_seed(seed)
    make = make or (lambda: (tuple(torch.randn_like(a) for a in example), {}))
    return CompileContext(plan=Plan("h100"), target=get_target("h100"), example_args=example, example_kwargs={},
                          calibration=[make() for _ in range(batches)], weights=weights)


def _masked_reference(model: torch.nn.Module, gm: torch.fx.GraphModule, plan_linears: list[LinearPlan]) -> torch.nn.Module:
    """A copy of ``model`` whose pruned linears hold W * keep, keep read from the compressed buffers."""
    reference = copy.deepcopy(model)
    for entry in plan_linears:
        if entry.level <= 0:
            continue
        owner, _, attr = entry.weight.rpartition(".")
        module = gm.get_submodule(owner)
        layout = Layout(entry.structure, entry.out_features, entry.in_features)
        keep = decompress(torch.ones_like(getattr(module, f"{attr}_values")), getattr(module, f"{attr}_mask"), layout)
        target = reference.get_submodule(owner)
        target.weight.data = target.weight.data * keep.bool()
    return reference


@pytest.mark.parametrize("structure,score", [("2:4", "wanda"), ("unstructured", "magnitude"),
                                             ("block32", "wanda"), ("4:8", "wanda")])
def test_pass_rewrites_and_matches_masked_dense(structure, score):
    torch.manual_seed(0)
    model = _TinyClassifier().eval()
    example = (torch.randn(2, 9, 64),)
    gm, _ = capture(model, example, {})
    classifier_weight = gm.classifier.weight
    ctx = _context(WeightSparsity(structure, 0.5, score=score), example)
    gm = PassManager([SparsifyWeights()]).run(gm, ctx)       # the manager recompiles the rewritten graph
    assert ctx.pass_stats["sparsify_weights"]["linears_sparse"] == 3
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(SPARSE_LINEAR) == 3 and targets.count(LINEAR) == 1
    # the classifier is untouched: same node kind, same tensor
    assert gm.classifier.weight is classifier_weight
    head = next(e for e in ctx.plan.linears if e.name == "classifier")
    assert head.level == 0 and "excluded" in head.reason
    # dense weights of pruned layers are gone, compressed ones registered
    assert not hasattr(gm.up, "weight") and gm.up.weight_mask.dtype == torch.uint8
    summary = ctx.plan.weights
    assert summary.global_sparsity == pytest.approx(0.5, abs=0.5 / 64)
    assert summary.compressed_bytes < 0.6 * summary.dense_bytes
    # outputs equal the masked dense model, on a fresh input of another shape
    x = torch.randn(3, 5, 64)
    reference = _masked_reference(model, gm, ctx.plan.linears)
    torch.testing.assert_close(gm(x), reference(x), rtol=1e-5, atol=1e-5)
    for entry in ctx.plan.linears[:3]:
        assert entry.candidates[0] == {"level": 0.0, "error": 0.0, "cost": entry.candidates[0]["cost"]}
        assert entry.error > 0 and entry.measured_contribution > 0
        assert entry.lowering["kernel"] in ("dense", "semi_structured", "block_sparse")


def test_pass_exclude_option_and_not_requested():
    torch.manual_seed(0)
    model = _TinyClassifier().eval()
    example = (torch.randn(2, 9, 64),)
    gm, _ = capture(model, example, {})
    untouched = SparsifyWeights().run(gm, _context(None, example))
    assert not untouched.modified
    mid_weight = gm.mid.weight
    ctx = _context(WeightSparsity("unstructured", 0.5, exclude=("mid", "classifier"), measure_each=False), example)
    SparsifyWeights().run(gm, ctx)
    assert gm.mid.weight is mid_weight and hasattr(gm.classifier, "weight")
    levels = {e.name: e.level for e in ctx.plan.linears}
    assert levels["mid"] == 0 and levels["classifier"] == 0 and levels["up"] > 0 and levels["down"] > 0


def test_apply_levels_from_a_search():
    torch.manual_seed(0)
    model = _TinyClassifier().eval()
    example = (torch.randn(2, 9, 64),)
    gm, _ = capture(model, example, {})
    ctx = _context(WeightSparsity("4:8", 0.0, measure_each=False, candidate_model_error=True), example)
    analyze_linears(gm, ctx)
    entries = ctx.plan.linears
    errors = {e.name: [c["error"] for c in e.candidates] for e in entries if e.candidates}
    assert all(err == sorted(err) for err in errors.values())   # nested masks: more pruning, more error
    model_errors = [c["model_error"] for e in entries for c in e.candidates]
    assert model_errors and min(model_errors) == 0 and max(model_errors) > 0
    ctx.weight_levels, ctx.weight_levels_by = {"up": 0.75, "mid": 0.5}, "search"
    result = SparsifyWeights().run(gm, ctx)         # reuses the analysis: nothing changed since
    by_name = {e.name: e for e in ctx.plan.linears}
    assert by_name["up"].level == 0.75 and by_name["up"].allocated_by == "search"
    assert by_name["down"].level == 0 and result.stats["linears_sparse"] == 2


def _llama_context(weights: WeightSparsity):
    from models import build_llama_gqa, llama_inputs

    model, example = build_llama_gqa()
    gm, _ = capture(model, (), example)
    torch.manual_seed(3)
    ctx = CompileContext(plan=Plan("h100"), target=get_target("h100"), example_args=(), example_kwargs=example,
                         calibration=[((), llama_inputs(2, 24)) for _ in range(4)], weights=weights)
    return model, gm, ctx, llama_inputs


def test_llama_owl_unstructured_budget_holds_on_held_out_inputs():
    model, gm, ctx, llama_inputs = _llama_context(WeightSparsity("unstructured", 0.5))
    reference = copy.deepcopy(gm)
    result = SparsifyWeights().run(gm, ctx)
    entries = [e for e in ctx.plan.linears if e.eligible]
    assert len(entries) == 14 and ctx.plan.linears[-1].name == "lm_head" and ctx.plan.linears[-1].level == 0
    assert len({round(e.level, 6) for e in entries}) > 1            # OWL spreads the levels
    assert result.stats["global_sparsity"] == pytest.approx(0.5, abs=1 / 64)
    # the error measured on calibration predicts the error on held-out inputs
    torch.manual_seed(11)
    held_out = [llama_inputs(3, 19) for _ in range(3)]
    outputs = [GraphRunner(result.graph_module).run((), kw) for kw in held_out]
    references = [GraphRunner(reference).run((), kw) for kw in held_out]
    calibrated = ctx.plan.weights.measured_error
    assert 0 < output_error(outputs, references) < 1.5 * calibrated + 0.02


def test_saved_program_keeps_the_compressed_form_and_shrinks(tmp_path):
    torch.manual_seed(0)
    model = _TinyClassifier(width=512).eval().to(torch.bfloat16)
    example = (torch.randn(2, 9, 64, dtype=torch.bfloat16),)
    dims = {"x": {0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO}}
    gm, _ = capture(model, example, {})
    dense_path, sparse_path = tmp_path / "dense.pt2", tmp_path / "sparse.pt2"
    torch.export.save(torch.export.export(gm, example, strict=False, dynamic_shapes=dims), dense_path)
    ctx = _context(WeightSparsity("2:4", 0.5, measure_each=False), example)
    gm = PassManager([SparsifyWeights()]).run(gm, ctx)
    torch.export.save(torch.export.export(gm, example, strict=False, dynamic_shapes=dims), sparse_path)
    summary = ctx.plan.weights
    saved = dense_path.stat().st_size - sparse_path.stat().st_size
    assert saved >= 0.9 * (summary.dense_bytes - summary.compressed_bytes)
    loaded = torch.export.load(sparse_path)
    assert sum(n.target == SPARSE_LINEAR for n in loaded.graph.nodes) == 3
    assert "mid.weight" not in loaded.state_dict and "mid.weight_values" in {**loaded.state_dict, **loaded.constants}
    x = torch.randn(4, 3, 64, dtype=torch.bfloat16)
    torch.testing.assert_close(loaded.module()(x), gm(x))


# -- cost model --

def test_plan_lowering_and_kernel_choice(monkeypatch):
    layout_24 = Layout("2:4", 4096, 4096)
    assert "CPU" in linear_costs.plan_lowering(layout_24, 0.5, get_target("cpu"))["reason"]
    assert linear_costs.plan_lowering(Layout("4:8", 4096, 4096), 0.5, get_target("h100"))["kernel"] == "dense"
    assert linear_costs.sparse_kernel(Layout("2:4", 4096, 100)) is None       # not a 64-multiple
    assert sparse_linear_gpu.choose_kernel(layout_24, 0.5, 16, torch.float32) == "dense"
    monkeypatch.setenv("SPARSEC_SPARSE_LINEAR", "sparse")
    assert sparse_linear_gpu.choose_kernel(layout_24, 0.5, 16, torch.bfloat16) == "semi_structured"
    assert sparse_linear_gpu.choose_kernel(Layout("block64", 4096, 4096), 0.5, 16, torch.bfloat16) == "block_sparse"
    monkeypatch.setenv("SPARSEC_SPARSE_LINEAR", "dense")
    assert sparse_linear_gpu.choose_kernel(layout_24, 0.5, 16, torch.bfloat16) == "dense"
    monkeypatch.setenv("SPARSEC_SPARSE_LINEAR", "auto")
    # the plan follows the measured table at every measured point, and interpolates between
    table = linear_costs.MEASURED_SPEEDUP
    for kernel, level in (("2:4", 0.5), ("block64@0.75", 0.75), ("block32@0.50", 0.5)):
        for shape, by_tokens in table[kernel].items():
            layout = Layout(kernel.partition("@")[0], *shape)
            record = linear_costs.plan_lowering(layout, level, get_target("h100"), tokens=tuple(by_tokens))
            assert record["sparse_at_tokens"] == [m for m, s in by_tokens.items() if s >= linear_costs.MIN_SPEEDUP]
    block = Layout("block64", 11008, 4096)
    between = linear_costs.predicted_speedup(block, 0.6, 16384)
    assert table["block64@0.50"][(11008, 4096)][16384] < between < table["block64@0.75"][(11008, 4096)][16384]
    assert sparse_linear_gpu.choose_kernel(block, 0.75, 4096, torch.bfloat16) == "block_sparse"
    assert sparse_linear_gpu.choose_kernel(Layout("block32", 4096, 4096), 0.5, 4096, torch.bfloat16) == "dense"


# -- Triton block-sparse matmul on the CPU interpreter --

def test_block_sparse_matmul_interpreted():
    script = textwrap.dedent("""
        import torch
        from sparsec.codegen.triton.block_sparse_matmul import block_sparse_matmul, reference_block_sparse_matmul
        torch.manual_seed(0)
        block, n, k = 32, 96, 160
        keep = torch.rand(n // block, k // block) < 0.5
        keep[1] = False                                   # an empty block row
        crow = torch.zeros(n // block + 1, dtype=torch.int32)
        crow[1:] = keep.sum(1).cumsum(0)
        col = keep.nonzero()[:, 1].to(torch.int32)
        values = torch.randn(int(keep.sum()), block, block)
        for m, bias in ((5, torch.randn(n)), (40, None)):    # split-K path, then one-tile-per-row path
            x = torch.randn(m, k)
            out = block_sparse_matmul(x, values.reshape(-1), crow, col, bias, block, n)
            ref = reference_block_sparse_matmul(x, values, crow, col, bias, block, n)
            assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4), (m, (out - ref).abs().max())
        print("ok")
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


# -- GPU kernels --

@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("structure,level", [("2:4", 0.5), ("2:4", 0.75), ("block32", 0.5), ("block64", 0.75),
                                             ("4:8", 0.5), ("unstructured", 0.6)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["sparse", "auto"])
def test_sparse_linear_cuda_matches_reference(structure, level, dtype, mode, monkeypatch):
    monkeypatch.setenv("SPARSEC_SPARSE_LINEAR", mode)
    torch.manual_seed(0)
    out_features, in_features = 192, 320
    parsed = parse_structure(structure)
    weight = torch.randn(out_features, in_features, device="cuda", dtype=dtype)
    bias = torch.randn(out_features, device="cuda", dtype=dtype)
    keep = parsed.mask(torch.rand(out_features, in_features, device="cuda"), level, "row")
    values, mask, layout = compress(weight, keep, parsed)
    for shape in ((1, in_features), (7, in_features), (2, 150, in_features), (1000, in_features)):
        x = torch.randn(shape, device="cuda", dtype=dtype)
        for b in (bias, None):
            out = torch.ops.sparsec.sparse_linear(x, values, mask, b, layout.encode())
            ref = F.linear(x.double(), (weight * keep).double(), None if b is None else b.double())
            assert out.shape == ref.shape and out.dtype == dtype and torch.isfinite(out).all()
            assert float((out.double() - ref).norm() / ref.norm()) < 1e-2, (shape, b is None)


@pytest.mark.gpu
@needs_cuda
def test_rewritten_model_runs_on_cuda():
    torch.manual_seed(0)
    model = _TinyClassifier(width=256).eval().to(torch.bfloat16)
    example = (torch.randn(2, 9, 64, dtype=torch.bfloat16),)
    gm, _ = capture(model, example, {})
    ctx = _context(WeightSparsity("2:4", 0.5, measure_each=False), example)
    gm = PassManager([SparsifyWeights()]).run(gm, ctx)
    x = torch.randn(4, 33, 64, dtype=torch.bfloat16)
    expected = gm(x).float()
    out = gm.to("cuda")(x.cuda()).float().cpu()
    assert float((out - expected).norm() / expected.norm()) < 2e-2


def test_linears_are_analysed_once_while_the_analysis_is_current(monkeypatch):
    torch.manual_seed(0)
    model = _TinyClassifier().eval()
    example = (torch.randn(2, 9, 64),)
    gm, _ = capture(model, example, {})
    permuted = copy.deepcopy(gm)
    ctx = _context(WeightSparsity("2:4", 0.5, measure_each=False), example)
    analysis = analyze_linears(gm, ctx)
    recordings = []
    monkeypatch.setattr(sparsify_weights, "LinearAnalysis",
                        lambda *args, **kwargs: recordings.append(args) or LinearAnalysis(*args, **kwargs))
    assert SparsifyWeights().run(gm, ctx).stats["linears_sparse"] == 3 and not recordings     # reused
    up = permuted.get_submodule("up")
    up.weight = torch.nn.Parameter(up.weight.detach()[torch.randperm(up.weight.shape[0])])   # as fusion permutes
    ctx.linear_analysis = analysis
    SparsifyWeights().run(permuted, ctx)
    assert len(recordings) == 1 and recordings[0][0] is permuted


class _UpDown(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(48, 96)
        self.down = torch.nn.Linear(96, 40)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


@pytest.mark.parametrize("structure,score", [("unstructured", "wanda"), ("2:4", "wanda"), ("block8", "magnitude")])
def test_analysis_follows_permuted_weights(structure, score):
    """Rows of ``up`` and columns of ``down`` permuted alike (as fuse_heads permutes q/k/v and
    o): the followed analysis prunes as an analysis of the permuted model does."""
    from sparsec.passes.helpers.head_permutation import permute_parameters

    torch.manual_seed(4)
    example = (torch.randn(2, 7, 48),)
    gm, _ = capture(_UpDown().eval(), example, {})
    ctx = _context(WeightSparsity(structure, 0.5, score=score, measure_each=False), example)
    analysis = analyze_linears(gm, ctx)
    order = torch.cat([torch.arange(8) + 8 * block for block in torch.randperm(12).tolist()])   # whole blocks
    indices = {"up.weight": (0, order), "up.bias": (0, order), "down.weight": (1, order)}
    untouched = dict(analysis.weights)
    permute_parameters(gm, indices)
    recorded = {target: (axis, index.tolist()) for target, (axis, index) in indices.items()}
    partial = {target: moved for target, moved in recorded.items() if target != "down.weight"}
    assert not analysis.follow_permutations(gm, partial) and analysis.weights == untouched   # left as it was
    assert analysis.follow_permutations(gm, recorded) and analysis.is_current(gm)
    fresh = LinearAnalysis(gm, list(analysis.nodes.values()), analysis.batches, analysis.structure, score, 1024)
    for name in analysis.nodes:
        torch.testing.assert_close(analysis.inputs[name].sq_norm, fresh.inputs[name].sq_norm)
        assert torch.equal(analysis.keep_mask(name, 0.5), fresh.keep_mask(name, 0.5)), name
