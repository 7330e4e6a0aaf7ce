"""One writer per field of the plan: heads change through ``HeadPlan.assign``, groups through
``AttentionSite.regroup`` / ``set_groups``; the passes' records survive JSON; derived facts
(effective causality, head order) are methods of the site."""
from __future__ import annotations

import pytest

from sparsec.ir.errors import ArtifactVersionError, PlanError
from sparsec.passes.fuse_heads import FuseHeads
from sparsec.ir.plan import (PLAN_VERSION, AttentionSite, CostRecord, FuseRecord, HeadGroup, HeadPlan, LinearPlan,
                          LinearSearchRecord, MergeRecord, Plan, SearchRecord, SiteSearchRecord, VerificationRecord,
                          WeightsRecord)


def _site(patterns, causal=True, extra=None) -> AttentionSite:
    heads = [HeadPlan(h, kind, params) for h, (kind, params) in enumerate(patterns)]
    return AttentionSite("layers.0.attn", 0, len(heads), len(heads), 16, causal, heads, extra=extra or {})


def test_one_instance_written_three_ways_is_one_group():
    """Classification writes ``[4, 0]``, a merge ``[4.0, 0.0]``, a hand edit ``4``: one mask, one launch."""
    site = _site([("window", {"window": [4, 0]}), ("dense", {}), ("window", {"window": [4.0, 0.0]}),
                  ("window", {"window": 4})])
    site.regroup()
    assert [(g.pattern, g.params, g.heads) for g in site.groups] == [
        ("window", {"window": [4, 0]}, [0, 2, 3]), ("dense", {}, [1])]
    assert site.instance_groups() == site.groups


def test_fuse_heads_groups_one_instance_written_three_ways_as_one_launch():
    site = _site([("window", {"window": [4, 0]}), ("window", {"window": [4.0, 0.0]}), ("window", {"window": 4})])
    record, _ = FuseHeads()._fuse_site(None, None, site, _CausalRecorder())
    assert record.launches_after == 1 and [g.heads for g in site.groups] == [[0, 1, 2]]


def test_set_groups_takes_a_partition_of_the_heads():
    site = _site([("window", {"window": [4, 0]}), ("window", {"window": 4}), ("dense", {})])
    site.set_groups([HeadGroup("window", {"window": 4}, [1]), HeadGroup("window", {"window": [4, 0]}, [0]),
                     HeadGroup("dense", {}, [2])], "a test's subgroups")
    assert [(g.params, g.heads) for g in site.groups] == [({"window": [4, 0]}, [1]), ({"window": [4, 0]}, [0]),
                                                          ({}, [2])]


@pytest.mark.parametrize("groups,message", [
    ([HeadGroup("window", {"window": 4}, [0, 1])], r"cover heads \[0, 1\]"),                     # misses head 2
    ([HeadGroup("window", {"window": 4}, [0, 1]), HeadGroup("dense", {}, [2, 1])], r"exactly one group"),
    ([HeadGroup("window", {"window": 4}, [0, 1, 2])], r"heads \[2\].*do not run"),              # dense head
    ([HeadGroup("window", {"window": 5}, [0, 1]), HeadGroup("dense", {}, [2])], r"heads \[0, 1\]"),
])
def test_set_groups_rejects_a_grouping_that_misses_duplicates_or_mislabels_heads(groups, message):
    site = _site([("window", {"window": [4, 0]}), ("window", {"window": 4}), ("dense", {})])
    site.regroup()
    before = list(site.groups)
    with pytest.raises(PlanError, match=message):
        site.set_groups(groups, "fuse_heads")
    assert site.groups == before


def test_assign_validates_the_kind_records_why_and_copies_the_params():
    head = HeadPlan(3)
    params = {"columns": [0, 5], "window": [8, 0]}
    head.assign("vertical_stripe", params, "planted")
    params["columns"].append(9)
    assert (head.pattern, head.params, head.reason) == ("vertical_stripe", {"columns": [0, 5], "window": [8, 0]},
                                                        "planted")
    with pytest.raises(ValueError, match="unknown pattern kind"):
        head.assign("diagonal_stripes", {}, "typo")
    assert head.pattern == "vertical_stripe"


class _CausalRecorder:
    """A cost model stand-in that records the causal flag each group is costed with."""

    def __init__(self):
        self.causal = []

    def site_seconds(self, groups, n, causal, head_dim):
        self.causal.append(causal)
        return sum(count * (1.0 if kind == "dense" else 0.5) + 0.1 for kind, _params, count in groups)


def test_fuse_heads_costs_merges_with_the_effective_causal_flag():
    """A bidirectional site whose user mask calibration found exactly causal is costed as causal
    (fuse_heads costed merges with ``site.causal`` before; classification and merging did not)."""
    site = _site([("window", {"window": [4, 0]}), ("window", {"window": [6, 0]}), ("dense", {})],
                 causal=False, extra={"mask_is_causal": True})
    recorder = _CausalRecorder()
    FuseHeads(merge_threshold=0.0)._fuse_site(None, None, site, recorder)
    assert recorder.causal and all(recorder.causal)
    assert site.effective_causal() and not _site([("dense", {})], causal=False).effective_causal()


def test_head_order_is_one_method_of_the_site():
    site = _site([("window", {"window": [4, 0]}), ("dense", {}), ("window", {"window": [4, 0]})])
    assert site.head_permutation() == [0, 1, 2] and site.kv_head_permutation() == [0, 1, 2]
    # fuse_heads ran heads [0, 2, 1]: position 1 is the model's head 2.
    site.heads = [HeadPlan(0, "window", {"window": [4, 0]}), HeadPlan(1, "window", {"window": [4, 0]}),
                  HeadPlan(2, "dense", {})]
    site.fusion = _fusion([0, 2, 1])
    assert site.head_permutation() == [0, 2, 1]
    model_order = site.heads_in_model_order()
    assert [(h.head, h.pattern) for h in model_order] == [(0, "window"), (1, "dense"), (2, "window")]
    assert site.heads[1].head == 1                     # the plan's own heads are untouched


def _fusion(order) -> FuseRecord:
    return FuseRecord(strategy="weights", reason="", head_permutation=order, kv_head_permutation=order,
                      launches_before=3, launches_after=2, groups_split_by_gqa=0, gqa_split=None,
                      permuted_parameters={"q_proj.weight": {"axis": 0, "index": [4, 5, 0, 1, 2, 3]}}, merges=[{"pattern": "window", "params": {"window": [6, 0]},
                                                                         "heads": [0, 1], "added_cost": -0.1}])


def _full_plan() -> Plan:
    site = _site([("window", {"window": [4, 0.25]}), ("dense", {})], causal=False, extra={"mask_is_causal": True})
    site.regroup()
    site.search = SiteSearchRecord(levels=[{"level": 0, "sensitivity": 0.0}], ladder=[[None], [None]],
                                   chosen_level=1, chosen_recall=0.98, sensitivity=0.004,
                                   measured_contribution=None, seconds=1.5e-5, dense_seconds=3e-5,
                                   densified_by_backoff=False)
    site.fusion = _fusion([1, 0])
    site.merge = MergeRecord(seq_len=4096, seconds_before=2e-5, seconds_after=1e-5, dense_seconds=3e-5,
                             merges=1, groups=2, heads_densified=0)
    plan = Plan(target="h100", attention=[site], error={"rel_l2_vs_dense_on_example": 0.01})
    plan.verification = VerificationRecord(metric="kl", max_error=0.02, min_top1=0.98, enforced=True, batches=2,
                                           lengths=[512], measured=0.011, top1_agreement=0.99,
                                           densified=[{"site": site.name, "head": 0, "pattern": "window",
                                                       "local_error": 0.3, "model_error_before": 0.05}],
                                           rounds=1, unverified_at_seq_len=16384)
    plan.search = SearchRecord(budget={"max_error": 0.02, "metric": "kl"}, mode="error", seq_len=16384, target="h100",
                               cost_profile={"calibrated": True}, predicted_error=0.01, measured_error=0.012,
                               held_out_batches=1, predicted_seconds=1.0, dense_seconds=2.0, predicted_speedup=2.0,
                               attention_seconds=1.0, attention_dense_seconds=2.0,
                               linears={"searched": 0, "sparse": 0, "seconds": 0.0, "dense_seconds": 0.0},
                               solver={"feasible": True}, backoff=[], within_budget=True,
                               all_dense_reason=None)
    plan.cost = CostRecord(target="h100", seq_len=16384, calibrated=True, attention_seconds=1.0,
                           dense_attention_seconds=2.0, predicted_attention_speedup=2.0)
    searched = LinearSearchRecord(level=0.5, predicted_error=0.003, measured_error=None, seconds=1e-5,
                                  dense_seconds=2e-5, speedup=1.6, lowering="semi_structured",
                                  levels=[{"level": 0.0, "sensitivity": 0.0}, {"level": 0.5, "sensitivity": 0.003}],
                                  densified_by_backoff=False)
    plan.linears = [LinearPlan(name="layers.0.q_proj", node="sparse_linear", weight="layers.0.q_proj.weight",
                               in_features=64, out_features=96, structure="2:4", score="wanda", comparison="row",
                               level=0.5, density=0.5, allocated_by="search", outlier_ratio=0.01,
                               candidates=[{"level": 0.0, "error": 0.0, "cost": 12288.0}], error=0.02,
                               dense_bytes=12288, compressed_bytes=6912,
                               lowering={"kernel": "semi_structured", "reason": "2:4"}, search=searched),
                    LinearPlan(name="lm_head", node="linear", weight="lm_head.weight", in_features=64,
                               out_features=100, structure="2:4", score="wanda", comparison="row",
                               reason="excluded (matches one of ['lm_head'])")]
    plan.weights = WeightsRecord(structure="2:4", score="wanda", target=0.5, global_sparsity=0.25,
                                 predicted_error=None, measured_error=0.004, dense_bytes=25088,
                                 compressed_bytes=19712)
    return plan


def test_records_round_trip_through_json():
    plan = _full_plan()
    again = Plan.from_json(plan.to_json())
    assert again == plan
    site = again.attention[0]
    assert isinstance(site.search, SiteSearchRecord) and isinstance(site.fusion, FuseRecord)
    assert isinstance(site.merge, MergeRecord) and isinstance(again.verification, VerificationRecord)
    assert isinstance(again.search, SearchRecord) and isinstance(again.cost, CostRecord)
    assert isinstance(again.weights, WeightsRecord) and all(isinstance(e, LinearPlan) for e in again.linears)
    assert isinstance(again.linears[0].search, LinearSearchRecord) and again.linears[1].search is None
    assert [e.eligible for e in again.linears] == [True, False]
    assert "weights: 2:4 (wanda), 1/2 linears sparse" in again.summary()
    assert site.head_permutation() == [1, 0] and site.effective_causal()
    assert "verified: kl=0.011" in again.summary() and "predicted attention speedup 2.00x" in again.summary()


def test_from_dict_is_strict():
    data = _full_plan().to_dict()
    data["attention"][0]["fusion"]["strategy_v2"] = "weights"
    with pytest.raises(PlanError, match="strategy_v2"):
        Plan.from_dict(data)
    for place in ("linear", "linear search", "weights", "head", "group", "site", "plan"):
        data = _full_plan().to_dict()
        {"linear": data["linears"][1], "linear search": data["linears"][0]["search"],
         "weights": data["weights"], "head": data["attention"][0]["heads"][1],
         "group": data["attention"][0]["groups"][0], "site": data["attention"][0],
         "plan": data}[place]["levels_v2"] = []
        with pytest.raises(PlanError, match="levels_v2"):
            Plan.from_dict(data)
    old = _full_plan().to_dict() | {"version": PLAN_VERSION - 1}
    with pytest.raises(ArtifactVersionError):
        Plan.from_dict(old)


def test_dense_is_a_role_of_the_family():
    assert HeadPlan(0).is_dense and HeadGroup("dense", {}, [0]).is_dense
    assert not HeadPlan(1, "window", {"window": [4, 0]}).is_dense
    assert not HeadGroup("skip", {}, [2]).is_dense          # computes nothing: not plain attention
