"""The layerwise sparsity search: budget, cost model, sensitivity, allocation, back-off."""
import copy
import json

import pytest
import torch

import sparsec
from sparsec.ir.budget import Budget
from sparsec.compiler import CompiledModel
from sparsec.analysis.cost_model import CALIBRATED, CostModel, cost_profile
from sparsec.passes.infra.dump import DumpWriter
from sparsec.ir.inputs import relative_l2
from sparsec.passes.infra.pass_manager import CompileContext, PassManager
from sparsec.passes.helpers.capture import capture
from sparsec.passes.calibrate import Calibrate
from sparsec.passes.canonicalize import Canonicalize
from sparsec.passes.lower import Lower
from sparsec.passes.search import Search
from sparsec.passes.helpers.search_ladder import Rung, dense_rung
from sparsec.passes.helpers.suffix_runs import SuffixRunner
from sparsec.ir.plan import HeadGroup, Plan
from sparsec.ir import reference
from sparsec.ir.targets import get_target

SEQ_LEN = 65536         # costs are predicted here (small heads: launches dominate at 8k); calibration runs at 64
SPANS = (1 / 4, 1 / 8, 1 / 16, 1 / 32)
LEVELS = (0.99, 0.95, 0.9, 0.8)


class PlantedStack(torch.nn.Module):
    """Residual attention layers whose locality is planted with ALiBi slopes.

    ``slopes[layer][head]``: attention decays as ``exp(-slope * offset)``; a slope of 0 makes
    the head attend nearly uniformly to every earlier token, so no window keeps its output
    (a *critical* head), while a slope of 1 keeps ~all mass within a few tokens.
    """

    def __init__(self, slopes, dim=32, heads=2, critical_scale=4.0):
        super().__init__()
        torch.manual_seed(0)
        self.heads, self.head_dim = heads, dim // heads
        self.register_buffer("slopes", torch.tensor(slopes, dtype=torch.float32))
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(dim, 3 * dim) for _ in slopes)
        self.out = torch.nn.ModuleList(torch.nn.Linear(dim, dim) for _ in slopes)
        with torch.no_grad():
            for layer, layer_slopes in enumerate(slopes):
                self.qkv[layer].weight[:2 * dim] *= 0.1          # small q.k: position decides
                self.out[layer].weight *= critical_scale if min(layer_slopes) == 0 else 0.5

    def forward(self, x):
        b, n, c = x.shape
        position = torch.arange(n, device=x.device)
        offset = (position[:, None] - position[None, :]).clamp(min=0).to(x.dtype)
        for layer in range(len(self.qkv)):
            q, k, v = self.qkv[layer](x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
            mask = -self.slopes[layer][None, :, None, None] * offset
            y = torch.ops.sparsec.attention(q, k, v, mask, self.head_dim ** -0.5, True)
            x = x + self.out[layer](y.transpose(1, 2).reshape(b, n, c))
        return x


def window_ladder(site, ctx, levels, cost, n):
    """Stand-in for the fit ladder: windows of growing span, the same for every head."""
    assert len(levels) == len(SPANS)
    ladder = []
    for _head in range(site.num_heads):
        rungs = []
        for target, span in zip(levels, SPANS):
            params = {"window": [0, span]}
            seconds = cost.head_seconds("window", params, n, site.causal, site.head_dim)
            faster = seconds < dense_rung(site, cost, n).seconds
            density = sparsec.patterns.get_pattern("window").density(params, n, site.causal)
            rungs.append(Rung("window", params, target, None, density, seconds) if faster else None)
        ladder.append(rungs)
    return ladder


def batches(count, seed, batch=2, length=64):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, length, 32, generator=generator),) for _ in range(count)]


_CAPTURED = {}


def search(model, budget, calibration=None, target="h100", dump_dir=None, ladder=window_ladder):
    """``sparsec.compile`` with the search, capturing each model once (export dominates).
    The budget reaches the pass through ``ctx.budget`` as compile passes it; ``ladder=None``
    calibrates and fits the real candidate ladder."""
    calibration = calibration or batches(5, seed=1)
    if id(model) not in _CAPTURED:
        _CAPTURED[id(model)] = (model, capture(model, calibration[0], {}))
    _model, (gm, record) = _CAPTURED[id(model)]
    plan = Plan(target=target, capture=record)
    ctx = CompileContext(plan=plan, target=get_target(target), example_args=calibration[0], example_kwargs={},
                         calibration=[(call, {}) for call in calibration], budget=budget)
    passes = [Canonicalize(), Search(ladder=ladder), Lower()] if ladder else \
        [Canonicalize(), Calibrate(), Search(), Lower()]
    gm = PassManager(passes, DumpWriter(dump_dir) if dump_dir else None).run(copy.deepcopy(gm), ctx)
    return CompiledModel(gm, plan, calibration[0], {})


def chosen_levels(plan):
    return [site.search.chosen_level for site in plan.attention]


CRITICAL_MIDDLE = [[1.0, 1.0], [0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]


def budget(**kwargs):
    return Budget(seq_len=SEQ_LEN, recall_levels=LEVELS, **kwargs)


@pytest.fixture(scope="module")
def planted():
    return PlantedStack(CRITICAL_MIDDLE).eval()


@pytest.fixture(scope="module")
def tight(planted):
    return search(planted, budget(max_error=0.02))


def test_critical_layer_stays_dense_and_the_rest_go_sparse(tight):
    levels = chosen_levels(tight.plan)
    assert levels[1] == 0, levels
    assert all(level > 0 for i, level in enumerate(levels) if i != 1), levels
    assert all(h.pattern == "dense" for h in tight.plan.attention[1].heads)
    assert all(h.pattern == "window" for i in (0, 2, 3) for h in tight.plan.attention[i].heads)
    record = tight.plan.search
    assert record.predicted_error <= 0.02 + 1e-12 and record.solver["exact"]
    assert record.predicted_speedup > 1.0
    # The critical layer's cheapest level costs far more error than the budget.
    critical = tight.plan.attention[1].search.levels
    assert min(level["sensitivity"] for level in critical[1:]) > 0.02


def test_looser_budget_sparsifies_more(planted, tight):
    loose = search(planted, budget(max_error=0.5))
    tight_record, loose_record = tight.plan.search, loose.plan.search
    assert loose_record.predicted_seconds < tight_record.predicted_seconds
    assert sum(chosen_levels(loose.plan)) > sum(chosen_levels(tight.plan))
    assert loose_record.measured_error > tight_record.measured_error


def test_budget_holds_on_held_out_and_fresh_inputs(planted, tight):
    record = tight.plan.search
    assert record.held_out_batches == 2
    assert record.measured_error <= 0.02
    with torch.no_grad():
        for (x,) in batches(3, seed=99, batch=3, length=64):
            assert relative_l2(planted(x), tight(x)) <= 0.02


def test_deterministic_for_fixed_inputs(planted, tight):
    again = search(planted, budget(max_error=0.02))
    assert again.plan.to_json() == tight.plan.to_json()


def test_sensitivity_table_and_allocation_in_dump_and_summary(planted, tmp_path):
    cm = search(planted, budget(max_error=0.02), calibration=batches(3, 1), dump_dir=tmp_path)
    record = json.loads((tmp_path / "002_search.json").read_text())
    table = record["decisions"]["sensitivity"]
    assert [row["layer"] for row in table] == [0, 1, 2, 3]
    level = table[0]["levels"][1]
    assert {"level", "sensitivity", "seconds", "density"} <= set(level)
    assert record["decisions"]["allocation"]["solver"]["feasible"]
    summary = cm.plan.summary()
    assert "search" in summary and "sensitivity" in summary and "predicted speedup" in summary


def test_backoff_redensifies_when_sensitivities_do_not_add(planted):
    # Each layer alone stays under the threshold (sensitivity 0), all together do not.
    def thresholded(dense, sparse):
        return max(0.0, relative_l2(dense, sparse) - 0.025)

    cm = search(planted, budget(max_error=1e-9, metric=thresholded))
    record = cm.plan.search
    assert record.predicted_error == 0.0
    assert record.backoff, "the plan should have been backed off"
    assert record.measured_error <= 1e-9 and record.within_budget
    for step in record.backoff:
        site = cm.plan.site(step["densified"])
        assert all(h.pattern == "dense" for h in site.heads) and site.search.densified_by_backoff
        assert step["measured_after"] < step["measured_before"]


def test_target_speedup_and_max_density_are_met(planted):
    fast = search(planted, budget(target_speedup=2.0))
    assert fast.plan.search.predicted_speedup >= 2.0 - 1e-9
    assert fast.plan.search.solver["feasible"]
    sparse = search(planted, budget(max_density=0.3))
    densities = [h.density for site in sparse.plan.attention for h in site.heads]
    assert sum(densities) / len(densities) <= 0.3 + 1e-9
    # Least error under the cap: the critical layer is the last to be sparsified.
    levels = chosen_levels(sparse.plan)
    assert levels[1] <= min(levels[i] for i in (0, 2, 3))


def test_per_head_keeps_the_critical_head_dense_with_a_pattern_limit():
    model = PlantedStack([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]]).eval()
    cm = search(model, budget(max_error=0.03, per_head=True, max_patterns_per_layer=2))
    mixed = cm.plan.attention[1]
    assert mixed.heads[1].pattern == "dense" and mixed.heads[0].pattern == "window"
    for site in cm.plan.attention:
        assert len(site.groups) <= 2
    assert cm.plan.search.measured_error <= 0.03


def test_fitted_ladder_from_calibration(planted):
    cm = search(planted, Budget(max_error=0.02, seq_len=SEQ_LEN), ladder=None)
    critical, local = cm.plan.attention[1], cm.plan.attention[0]
    assert all(h.pattern == "dense" for h in critical.heads)
    assert all(h.pattern != "dense" and h.recall >= 0.8 for h in local.heads)
    ladder = local.search.ladder[0]
    recalls = [rung["recall"] for rung in ladder if rung]
    assert recalls and all(r >= t - 1e-9 for r, t in zip(recalls, [rung["target"] for rung in ladder if rung]))
    assert all(rung["seconds"] < local.search.dense_seconds for rung in ladder if rung)
    assert cm.plan.search.measured_error <= 0.02


def test_suffix_run_equals_full_run_with_the_same_groups():
    model = PlantedStack([[1.0, 1.0], [0.5, 0.0], [1.0, 1.0]]).eval()
    (x,) = batches(1, seed=5, batch=3, length=37)[0]
    cm = sparsec.compile(model, (x,), passes=[Canonicalize()])
    gm = cm.graph_module
    nodes = [n for n in gm.graph.nodes if n.target == torch.ops.sparsec.attention.default]
    runner = SuffixRunner(gm, nodes)
    cache, dense = runner.dense(((x,), {}))
    with torch.no_grad():
        torch.testing.assert_close(dense, model(x))
        groups = [HeadGroup("window", {"window": [3, 0]}, [0]), HeadGroup("dense", {}, [1])]
        suffix = runner.run(cache, {nodes[1]: groups})
        expected = _run_with_groups(model, x, layer=1, groups=groups)
    torch.testing.assert_close(suffix, expected)
    assert relative_l2(dense, suffix) > 1e-4


def _run_with_groups(model, x, layer, groups):
    b, n, c = x.shape
    position = torch.arange(n)
    offset = (position[:, None] - position[None, :]).clamp(min=0).to(x.dtype)
    for index in range(len(model.qkv)):
        q, k, v = model.qkv[index](x).view(b, n, 3, model.heads, model.head_dim).permute(2, 0, 3, 1, 4)
        mask = -model.slopes[index][None, :, None, None] * offset
        y = (reference.sparse_attention(q, k, v, mask, model.head_dim ** -0.5, True, groups) if index == layer
             else reference.dense_attention(q, k, v, mask, model.head_dim ** -0.5, True))
        x = x + model.out[index](y.transpose(1, 2).reshape(b, n, c))
    return x


# -- budget and cost model --------------------------------------------------------------------------

def test_budget_validation_and_metrics():
    with pytest.raises(ValueError, match="exactly one"):
        Budget()
    with pytest.raises(ValueError, match="exactly one"):
        Budget(max_error=0.1, target_speedup=2.0)
    with pytest.raises(ValueError, match="unknown metric"):
        Budget(max_error=0.1, metric="l1")
    with pytest.raises(ValueError, match="max_density"):
        Budget(max_density=1.5)
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    noisy = logits + 0.1 * torch.randn_like(logits)
    assert Budget(max_error=1, metric="kl").measure(logits, logits) == pytest.approx(0.0, abs=1e-12)
    kl = Budget(max_error=1, metric="kl").measure(logits, noisy)
    p, q = torch.softmax(logits.double(), -1), torch.softmax(noisy.double(), -1)
    assert kl == pytest.approx(float((p * (p / q).log()).sum(-1).mean()), rel=1e-4)   # fp32 log-probabilities
    cosine = Budget(max_error=1, metric="cosine").measure(logits, noisy)
    assert cosine == pytest.approx(float((1 - torch.cosine_similarity(logits, noisy, dim=-1)).mean()), rel=1e-4)
    assert Budget(max_error=1).measure((logits,), (noisy,)) == pytest.approx(relative_l2(logits, noisy))
    assert Budget(max_error=1, metric=lambda a, b: 7.0).measure(logits, noisy) == 7.0


def test_cost_model_dense_crossover_and_calibration():
    model = CostModel("h100")
    assert model.profile is CALIBRATED["h100"]
    # Calibrated against the measured dense SDPA time at N=16384 (3.770 ms; see cost_model).
    dense = model.site_seconds([("dense", {}, 32)], 16384, True, 128)
    assert dense == pytest.approx(3.770e-3, rel=0.05)
    narrow = model.site_seconds([("window", {"window": [1024, 0]}, 32)], 16384, True, 128)
    assert narrow < dense / 3
    # A fixed window wins only past its crossover length; a 3/4 N window never does.
    crossover = model.crossover_length("window", {"window": [512, 0]}, True, 128)
    assert 512 < crossover < 4096
    assert model.head_seconds("window", {"window": [512, 0]}, crossover, True, 128) < \
        model.head_seconds("dense", {}, crossover, True, 128)
    assert model.head_seconds("window", {"window": [512, 0]}, crossover // 2, True, 128) >= \
        model.head_seconds("dense", {}, crossover // 2, True, 128)
    assert model.crossover_length("window", {"window": [0, 0.75]}, True, 128) is None
    # Uncalibrated targets scale with their datasheet.
    a100 = cost_profile("a100")
    assert not a100.calibrated and a100.dense.tflops < CALIBRATED["h100"].dense.tflops
    assert model.site_seconds([("skip", {}, 4)], 4096, True, 128) == 0.0


def test_an_all_dense_result_says_which_constraint_bound(planted):
    with pytest.warns(UserWarning, match="kept every layer dense: the least sensitive sparse level costs"):
        strict = search(planted, budget(max_error=1e-9))
    assert "raise max_error" in strict.plan.search.all_dense_reason
    short = Budget(seq_len=64, recall_levels=LEVELS, max_error=0.5)
    with pytest.warns(UserWarning, match="no head has a pattern predicted faster than dense at N=64"):
        search(planted, short)
