"""Every compile ends with verification: measured error recorded, heads densified to fit."""
import warnings

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import sparsec
from sparsec.ir.inputs import relative_l2
from sparsec.testing.planted import planted_llama, planted_llama_inputs
from sparsec.ir.tolerance import Tolerance, resolve_tolerance


def _planted(length=256, batch=2):
    torch.manual_seed(0)
    return planted_llama(layers=2, heads=8, kv_heads=2, head_dim=64, hidden=256, intermediate=256), \
        planted_llama_inputs(batch=batch, length=length, seed=3)


def _sparse_heads(plan):
    return sum(h.pattern != "dense" for s in plan.attention for h in s.heads)


def test_low_recall_is_densified_until_within_tolerance():
    model, ids = _planted()
    loose = sparsec.compile(model, (ids,), target="h100", seq_len=16384, recall=0.3, tolerance=None)
    assert loose.plan.verification.measured > 0.05        # the unverified plan is wrong
    checked = sparsec.compile(model, (ids,), target="h100", seq_len=16384, recall=0.3)
    record = checked.plan.verification
    assert record.within_tolerance and record.metric == "rel_l2"
    assert record.measured <= 0.05 and record.densified
    # Made denser: refitted at higher recalls or dense, so predicted to run slower.
    assert checked.plan.cost.predicted_attention_speedup < loose.plan.cost.predicted_attention_speedup
    # Each head's last step: made dense, it stays so (counted per site: fuse_heads renumbers
    # heads; a refitted head may then share a wider group, or go dense for its launch).
    last = {(step["site"], step["head"]): step for step in record.densified}
    for site in checked.plan.attention:
        steps = [step for (name, _), step in last.items() if name == site.name]
        touched = [head for head in site.heads if head.reason.startswith("verify: ")]
        assert len(touched) <= len(steps)
        assert sum(head.is_dense for head in touched) == sum(not step["refit"] for step in steps)
    with torch.no_grad():
        assert relative_l2(model(ids), checked(ids)) <= 0.05            # the compiled model itself
    summary = checked.plan.summary()
    assert f"{len(record.densified)} step(s) of verification made heads denser" in summary
    cost = checked.plan.cost
    assert cost.seq_len == 16384 and f"predicted attention speedup {cost.predicted_attention_speedup:.2f}x" in summary


def test_rounds_run_on_the_first_batch_and_the_plan_is_confirmed_on_every_batch(monkeypatch):
    from sparsec.passes.helpers.suffix_runs import SuffixRunner

    runs = []
    original = SuffixRunner.run
    monkeypatch.setattr(SuffixRunner, "run", lambda self, cache, *rest: runs.append(id(cache)) or
                        original(self, cache, *rest))
    model, ids = _planted(batch=1)
    batches = [(planted_llama_inputs(batch=1, length=256, seed=seed),) for seed in (3, 4, 5)]
    checked = sparsec.compile(model, (ids,), calibration=batches, target="h100", seq_len=16384, recall=0.3)
    record = checked.plan.verification
    assert record.within_tolerance and record.rounds >= 1 and record.batches == 3
    first = runs[0]
    # Measurements of the first batch alone until the plan holds there, then every batch at
    # each measurement (rounds go on over all three where the others fail).
    alone = next(i for i, run in enumerate(runs) if run != first) - 1
    together = [runs[i:i + 3] for i in range(alone, len(runs), 3)]
    assert alone >= 1 and runs[:alone] == [first] * alone and len(runs) == alone + 3 * len(together)
    assert all(len(set(chunk)) == 3 and chunk[0] == first for chunk in together)
    assert record.rounds == alone - 1 + len(together) - 1
    with torch.no_grad():
        assert max(relative_l2(model(*b), checked(*b)) for b in batches) <= 0.05 + 1e-3


def test_verification_on_the_calibration_batches_reuses_calibrates_dense_runs(monkeypatch):
    from sparsec.passes.helpers.suffix_runs import SuffixRunner

    dense_runs = []
    original = SuffixRunner.dense
    monkeypatch.setattr(SuffixRunner, "dense", lambda self, call: dense_runs.append(call) or original(self, call))
    model, ids = _planted(batch=1)
    batches = [(planted_llama_inputs(batch=1, length=256, seed=seed),) for seed in (3, 4)]
    reused = sparsec.compile(model, (ids,), calibration=batches, target="h100", seq_len=16384, recall=0.3)
    assert dense_runs == []
    # The same batches given as verification inputs: verify runs them itself, to the same plan.
    own = sparsec.compile(model, (ids,), calibration=batches, verification=batches, target="h100",
                          seq_len=16384, recall=0.3)
    assert len(dense_runs) == 2
    assert own.plan.verification.densified == reused.plan.verification.densified
    assert own.plan.verification.measured == pytest.approx(reused.plan.verification.measured, rel=1e-5)


def test_tolerance_none_warns_with_the_measured_error():
    model, ids = _planted()
    with pytest.warns(UserWarning, match=r"measured rel_l2 is [0-9.e-]+ .*over the tolerance"):
        compiled = sparsec.compile(model, (ids,), target="h100", seq_len=16384, recall=0.3, tolerance=None)
    assert not compiled.plan.verification.densified


def test_verification_inputs_at_another_length_are_used():
    model, ids = _planted(length=128)
    longer = planted_llama_inputs(batch=1, length=320, seed=5)
    compiled = sparsec.compile(model, (ids,), target="h100", seq_len=16384, verification=[(longer,)])
    record = compiled.plan.verification
    assert record.lengths == [320] and record.within_tolerance
    with torch.no_grad():
        assert relative_l2(model(longer), compiled(longer)) <= 0.05


def _tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, use_cache=False)
    return LlamaForCausalLM(config).eval(), torch.randint(0, 256, (2, 96))


def test_language_models_are_verified_by_kl_and_top1():
    model, ids = _tiny_llama()
    compiled = sparsec.compile(model, {"input_ids": ids}, target="h100", seq_len=16384, recall=0.2)
    record = compiled.plan.verification
    assert record.metric == "kl" and record.min_top1 == 0.98
    assert record.within_tolerance and record.top1_agreement >= 0.98 and record.measured <= 0.02
    # The model as returned, against the original model on the example: the same tolerance.
    assert compiled.plan.error["kl_vs_dense_on_example"] <= 0.02
    assert compiled.plan.error["top1_vs_dense_on_example"] >= 0.98


def test_a_model_changed_after_verification_is_reported(monkeypatch):
    """Verification measures the canonical graph before head fusion and lowering; the model
    as returned is checked against the original too, and a change after verification that
    breaks the tolerance is said (here: fuse_heads made to scale the LM head's weight)."""
    from sparsec.passes.fuse_heads import FuseHeads

    model, ids = _tiny_llama()
    fuse = FuseHeads.run

    def breaking(self, gm, ctx):
        result = fuse(self, gm, ctx)
        dict(result.graph_module.named_parameters())["lm_head.weight"].data.mul_(3.0)
        return result

    monkeypatch.setattr(FuseHeads, "run", breaking)
    with pytest.warns(UserWarning, match=r"kl against the original model on the example input is [0-9.e-]+, "
                                         r"top-1 agreement [0-9.]+, over the tolerance .*verification measured"):
        compiled = sparsec.compile(model, {"input_ids": ids}, target="h100", recall=0.2)
    assert compiled.plan.verification.within_tolerance
    assert compiled.plan.error["kl_vs_dense_on_example"] > 0.02


def test_a_compile_without_verification_is_checked_against_the_original():
    """A pass list without Verify: the returned model's error over the tolerance is said."""
    from sparsec.passes.canonicalize import Canonicalize
    from sparsec.passes.lower import Lower
    from sparsec.testing.plant_patterns import PlantPatterns

    model, ids = _planted(length=128, batch=1)
    with pytest.warns(UserWarning, match=r"rel_l2 against the original model .* no verification ran"):
        compiled = sparsec.compile(model, (ids,), passes=[Canonicalize(), PlantPatterns([], ("window", {"window": 4})),
                                                          Lower()])
    assert compiled.plan.verification is None and compiled.plan.error["rel_l2_vs_dense_on_example"] > 0.05


def test_given_plan_is_measured_not_changed():
    model, ids = _planted()
    loose = sparsec.compile(model, (ids,), target="h100", seq_len=16384, recall=0.3, tolerance=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = sparsec.compile(model, (ids,), target="h100", plan=loose.plan)
    assert _sparse_heads(again.plan) == _sparse_heads(loose.plan)
    assert not again.plan.verification.within_tolerance
    assert any("over the tolerance" in str(w.message) for w in caught)


def test_resolve_tolerance():
    lm_output = {"logits": torch.randn(1, 4, 10)}
    assert resolve_tolerance("auto", lm_output, None) == (Tolerance("kl", 0.02, 0.98), True)
    assert resolve_tolerance(0.1, torch.randn(3), None) == (Tolerance("rel_l2", 0.1), True)
    assert resolve_tolerance(None, torch.randn(3), None)[1] is False
    speed = sparsec.Budget(target_speedup=2.0)
    assert resolve_tolerance("auto", torch.randn(3), speed)[1] is False
    error = sparsec.Budget(max_error=0.01, metric="cosine")
    assert resolve_tolerance("auto", torch.randn(3), error) == (Tolerance("cosine", 0.01), True)
    with pytest.raises(ValueError, match="tolerance must be"):
        resolve_tolerance("strict", torch.randn(3), None)


def test_a_plan_costed_past_its_verified_lengths_says_so():
    model, ids = _planted(length=128)
    with pytest.warns(UserWarning, match=r"costed for seq_len=16384 but verified only at lengths \[128\]"):
        compiled = sparsec.compile(model, (ids,), target="h100", seq_len=16384)
    assert compiled.plan.verification.unverified_at_seq_len == 16384


def test_a_low_precision_model_is_verified_above_its_own_noise_floor(tmp_path):
    ids = planted_llama_inputs(batch=1, length=256, seed=3)

    def model(long_context):
        return planted_llama(layers=2, heads=8, kv_heads=2, head_dim=64, hidden=256, intermediate=256,
                             long_context=long_context).to(torch.bfloat16)

    record = sparsec.compile(model(True), (ids,), target="h100", seq_len=16384).plan.verification
    assert record.noise_floor is not None and 0 < record.noise_floor < 0.05
    assert record.within_tolerance and record.measured - record.noise_floor <= record.max_error
    compiled = sparsec.compile(model(True), (ids,), target="h100", seq_len=16384)
    assert "noise floor" in compiled.plan.summary()
    compiled.report(tmp_path / "report.html")
    assert "noise floor" in (tmp_path / "report.html").read_text()
    # A tolerance below the floor cannot be checked in bf16, and compile says so.
    with pytest.warns(UserWarning, match="noise floor"):
        sparsec.compile(model(True), (ids,), target="h100", seq_len=16384,
                        tolerance=Tolerance("rel_l2", record.noise_floor / 2))
    fp32 = sparsec.compile(model(True).float(), (ids,), target="h100", seq_len=16384).plan.verification
    assert fp32.noise_floor is None


def test_the_heads_made_dense_first_are_those_whose_error_buys_the_least_saving():
    from sparsec.passes.verify import _worst

    local = {("a", 0): 4.0, ("a", 1): 1.0, ("b", 0): 3.0, ("b", 1): 2.0}
    costs = {("a", 0): 100.0, ("a", 1): 1.0, ("b", 0): 10.0, ("b", 1): 50.0}
    # error per FLOP given up: a1 1.0, b0 0.3, a0 0.04, b1 0.04 (a0 first among equals by
    # key); half of the total error (5) is covered after a1, b0 and a0.
    assert _worst(local, costs) == [("a", 1), ("b", 0), ("a", 0)]
    assert _worst(local, costs, 0.3) == [("a", 1), ("b", 0)]           # 4 of 10 covers 3
    assert _worst(local, costs, 0.9) == [("a", 1), ("b", 0), ("a", 0), ("b", 1)]
    # Refits remove half of a head's error: the share is of what the steps could remove
    # (5 here), and they rank by the error they remove: a refit of a0 (2 for 10 FLOPs) goes
    # before making b0 dense (3 for 100).
    refits = {("a", 0): 0.5, ("a", 1): 1.0, ("b", 0): 1.0, ("b", 1): 0.5}
    cheap_refit = {**costs, ("a", 0): 10.0, ("b", 0): 100.0}
    assert _worst(local, cheap_refit, 0.4, refits) == [("a", 1), ("a", 0)]        # 1 + 2 covers 0.4 of 7
    assert _worst(local, costs, 0.4, dict.fromkeys(local, 0.5)) == [("a", 1), ("b", 0)]


def test_excess_is_the_larger_ratio_to_the_tolerance():
    lm = Tolerance("kl", 0.02, min_top1=0.98)
    assert lm.excess(0.01, 0.95) == pytest.approx(2.5)              # top-1: 0.05 of 0.02 allowed
    assert lm.excess(0.06, 0.99) == pytest.approx(3.0)              # KL: 0.06 of 0.02
    assert lm.excess(0.0, None) == 0.0 and Tolerance("rel_l2", 0.0).excess(1e-9, None) == float("inf")


@pytest.mark.parametrize("mask_heads", [1, 6])
def test_dense_attention_of_some_heads_equals_those_heads_of_the_whole(mask_heads):
    from sparsec.ir import reference

    torch.manual_seed(1)
    q, k, v = torch.randn(2, 6, 77, 16), torch.randn(2, 3, 77, 16), torch.randn(2, 3, 77, 16)
    mask = torch.randn(2, mask_heads, 77, 77) > -1.0
    heads = torch.tensor([5, 0, 3])
    whole = reference.dense_attention(q, k, v, mask, 0.3, False)
    torch.testing.assert_close(reference.dense_heads(q, k, v, mask, 0.3, False, heads), whole[:, heads])


def test_a_head_over_tolerance_is_refitted_at_an_eighth_of_its_missing_recall_then_made_dense():
    """A step keeps the head sparse where a refit at recall ``1 - (1 - r) / 8`` still pays
    and the head may be refitted; each step keeps more attention mass, the last one is the
    site's baseline."""
    from sparsec.analysis.cost_model import CostModel
    from sparsec.passes.calibrate import Calibrate
    from sparsec.passes.classify_heads import ClassifyHeads
    from sparsec.passes.verify import _next_step
    from test_calibrate_classify import run_passes

    model, ids = _planted()
    ctx = run_passes(model, (ids,), [(ids,)], [Calibrate(), ClassifyHeads()], target="h100", recall=0.5,
                     seq_len=16384)
    site = ctx.plan.attention[0]
    head = next(h for h in site.heads if not h.is_dense)
    cost_model, recalls, refits = CostModel(ctx.target), [head.recall], []
    while not head.is_dense:
        before = head.recall
        step = _next_step(site, head.head, ctx, cost_model)
        step.take(site, head.head, "over tolerance")
        refits.append(step.refit)
        if step.refit:
            target = 1 - (1 - before) / 8
            assert head.recall >= target - 1e-6 and head.reason.startswith(f"verify: refitted at recall {target:.4g}")
            recalls.append(head.recall)
    assert refits[0] and not refits[-1] and all(refits[:-1])
    assert recalls == sorted(recalls) and head.reason.startswith("verify: made dense")
    sparse = next(h for h in site.heads if not h.is_dense)
    step = _next_step(site, sparse.head, ctx, cost_model, may_refit=False)
    step.take(site, sparse.head, "over tolerance")
    assert not step.refit and sparse.is_dense


def test_a_layout_taken_from_the_calibration_text_is_never_a_refit():
    """A block_topk layout is the calibration text's content, stretched to other lengths: a
    head over tolerance is not refitted into one (its own family included), it goes dense."""
    from sparsec.analysis.cost_model import CostModel
    from sparsec.passes.calibrate import Calibrate
    from sparsec.passes.classify_heads import ClassifyHeads
    from sparsec.passes.verify import _next_step
    from test_calibrate_classify import run_passes

    model, ids = _planted()
    ctx = run_passes(model, (ids,), [(ids,)], [Calibrate(), ClassifyHeads()], target="h100", recall=0.5,
                     seq_len=16384, patterns=("block_topk",))
    site = next(s for s in ctx.plan.attention if any(h.pattern == "block_topk" for h in s.heads))
    head = next(h for h in site.heads if h.pattern == "block_topk")
    step = _next_step(site, head.head, ctx, CostModel(ctx.target))
    assert not step.refit and step.pattern == "dense"
