"""The plan: every decision sparsec made, versioned and JSON-serialisable.

Passes write it, codegen reads it, the runtime loads it, dumps show it. Each field has one
writer path: a head's pattern changes through :meth:`HeadPlan.assign`, a site's groups
through :meth:`AttentionSite.regroup` (one group per pattern instance) or
:meth:`AttentionSite.set_groups` (fusion's checked partition); the passes' records are typed
(:class:`SearchRecord`, :class:`FuseRecord`, ...). Derived facts (effective causality, head
order) are methods of the site. ``to_dict()`` has the shape other tools read::

    {"version", "target", "recall_threshold",
     "attention": [{"name", "layer", "num_heads", "num_kv_heads", "head_dim", "causal",
       "heads": [{"head", "pattern", "params", "recall", "density", "candidates", "reason"}],
       "groups": [{"pattern", "params", "heads"}], ..., "search", "fusion", "merge"}],
     "linears": [{"name", "node", "weight", ..., "level", "density", ..., "search"}],
     "unmatched", "capture", "error", "verification", "search", "cost", "weights", "extra"}
"""
from __future__ import annotations

import copy
import functools
import json
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from sparsec.ir.errors import ArtifactVersionError, PlanError
from sparsec.patterns import canonical_params, get_pattern, instance_key

# 2: the passes' records moved from ``extra`` dicts to typed fields (search, fusion, merge,
# verification, cost, weights) and the linears' entries are typed (:class:`LinearPlan`).
PLAN_VERSION = 2


class _Record:
    """A typed record (a dataclass) with the JSON form ``asdict`` gives. ``from_dict`` refuses
    unknown keys and decodes the fields typed as records (``Record | None``, ``list[Record]``)."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict):
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise PlanError(f"{cls.__name__} has no field(s) {sorted(unknown)}")
        data = dict(data)
        for name, record, is_list in _record_fields(cls):
            if data.get(name) is not None:
                data[name] = [record.from_dict(v) for v in data[name]] if is_list else record.from_dict(data[name])
        return cls(**data)


@functools.cache
def _record_fields(cls: type) -> list[tuple[str, type, bool]]:
    """``(field, record class, a list of them?)`` for each field of ``cls`` typed as records."""
    found = []
    for name, hint in typing.get_type_hints(cls).items():
        is_list = typing.get_origin(hint) is list
        if is_list or isinstance(hint, types.UnionType):
            found += [(name, arg, is_list) for arg in typing.get_args(hint)
                      if isinstance(arg, type) and issubclass(arg, _Record)]
    return found


class RunsPattern:
    """Something that runs one pattern instance; ``pattern`` names its family. Roles are read
    from the family (:class:`sparsec.patterns.base.Pattern`), never from its name."""

    pattern: str

    @property
    def is_dense(self) -> bool:
        """Whether it runs plain attention (the family ``computes_all``)."""
        return get_pattern(self.pattern).computes_all


@dataclass
class HeadPlan(RunsPattern, _Record):
    head: int
    pattern: str = "dense"
    params: dict = field(default_factory=dict)
    recall: float | None = None
    density: float | None = None
    # Every candidate tried: {"pattern", "params", "recall", "density"}.
    candidates: list[dict] = field(default_factory=list)
    # Why the head took this pattern (e.g. why it stayed dense).
    reason: str = ""

    def assign(self, kind: str, params: dict, reason: str) -> None:
        """Run this head with pattern ``kind`` (a registered family) and ``params``; ``reason``
        says why (it replaces the previous reason). The only writer of pattern and params."""
        get_pattern(kind)                       # raises on an unknown kind
        self.pattern, self.params, self.reason = kind, copy.deepcopy(dict(params)), reason


@dataclass
class HeadGroup(RunsPattern, _Record):
    """Heads of one attention site that run one pattern instance in one launch."""

    pattern: str
    params: dict
    heads: list[int]


def group_heads(heads: list[HeadPlan]) -> list[HeadGroup]:
    """One group per pattern instance (:func:`sparsec.patterns.instance_key`), canonical
    parameters, in order of each instance's first head."""
    groups: dict[str, HeadGroup] = {}
    for head in heads:
        key = instance_key(head.pattern, head.params)
        groups.setdefault(key, HeadGroup(head.pattern, canonical_params(head.pattern, head.params), []))
        groups[key].heads.append(head.head)
    return list(groups.values())


@dataclass
class SiteSearchRecord(_Record):
    """What the search (passes/search.py) decided for one site."""

    levels: list                 # the sensitivity table rows (per level, or per head and rung)
    ladder: list                 # per head, per recall level: the rung (a dict) or None
    chosen_level: int
    chosen_recall: float
    sensitivity: float           # summed predicted sensitivity of the chosen level(s)
    measured_contribution: float | None
    seconds: float
    dense_seconds: float
    densified_by_backoff: bool


@dataclass
class FuseRecord(_Record):
    """How fuse_heads ordered and grouped one site's heads (passes/fuse_heads.py)."""

    strategy: str                # "weights", "gather", "head_index" or "none"
    reason: str
    head_permutation: list[int]  # head i of the site is the model's head head_permutation[i]
    kv_head_permutation: list[int]
    launches_before: int
    launches_after: int
    groups_split_by_gqa: int
    gqa_split: str | None
    # parameter name -> {"axis", "index"}: the parameter became ``index_select(axis, index)``
    # of itself (so sparsify_weights follows the permutation instead of calibrating again).
    permuted_parameters: dict
    merges: list[dict]           # head_grouping.Merge records: pattern, params, heads, added_cost


@dataclass
class MergeRecord(_Record):
    """merge_head_groups' record of one site: predicted time before and after."""

    seq_len: int
    seconds_before: float
    seconds_after: float
    dense_seconds: float
    merges: int
    groups: int
    heads_densified: int


@dataclass
class AttentionSite(_Record):
    name: str
    layer: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    causal: bool
    heads: list[HeadPlan] = field(default_factory=list)
    groups: list[HeadGroup] = field(default_factory=list)
    node: str = ""                 # fx node name of the canonical attention
    source: str = ""               # which form was recognised (sdpa, eager, ...)
    has_mask: bool = False
    notes: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # small facts: lowered, mask_is_causal, model_window
    search: SiteSearchRecord | None = None
    fusion: FuseRecord | None = None
    merge: MergeRecord | None = None

    def effective_causal(self) -> bool:
        """The causal flag, or a user mask that calibration found to be exactly causal."""
        return self.causal or bool(self.extra.get("mask_is_causal"))

    def instance_groups(self) -> list[HeadGroup]:
        """The heads grouped by pattern instance as they are now (:func:`group_heads`)."""
        return group_heads(self.heads)

    def regroup(self) -> None:
        """Set ``groups`` from the heads: one group per pattern instance."""
        self.groups = self.instance_groups()

    def set_groups(self, groups: list[HeadGroup], reason: str) -> None:
        """Set a partition of the heads other than :meth:`regroup`'s (fusion's subgroups),
        checked: every head in exactly one group, running its group's pattern instance.
        ``reason`` names the writer in the error."""
        covered = sorted(h for group in groups for h in group.heads)
        expected = sorted(head.head for head in self.heads)
        if covered != expected:
            raise PlanError(f"{reason}: the groups of site {self.name} cover heads {covered}; "
                            f"each of {expected} must be in exactly one group")
        by_head = {head.head: head for head in self.heads}
        for group in groups:
            key = instance_key(group.pattern, group.params)
            stray = [h for h in group.heads if instance_key(by_head[h].pattern, by_head[h].params) != key]
            if stray:
                raise PlanError(f"{reason}: heads {stray} of site {self.name} do not run their group's "
                                f"{group.pattern} {group.params}; assign the heads first")
        self.groups = [HeadGroup(g.pattern, canonical_params(g.pattern, g.params), list(g.heads)) for g in groups]

    def head_permutation(self) -> list[int]:
        """Head ``i`` of the site as it runs is the model's head ``head_permutation()[i]``
        (identity unless fuse_heads reordered the heads)."""
        return list(self.fusion.head_permutation) if self.fusion else list(range(self.num_heads))

    def kv_head_permutation(self) -> list[int]:
        """The key/value heads' order, as :meth:`head_permutation`."""
        return list(self.fusion.kv_head_permutation) if self.fusion else list(range(self.num_kv_heads))

    def heads_in_model_order(self) -> list[HeadPlan]:
        """Copies of the site's heads numbered as in the unpermuted model."""
        heads: list = [None] * self.num_heads
        for position, original in enumerate(self.head_permutation()):
            heads[original] = copy.deepcopy(self.heads[position])
            heads[original].head = original
        return heads


@dataclass
class VerificationRecord(_Record):
    """The verify pass's measurement of the final plan (passes/verify.py)."""

    metric: str
    max_error: float
    min_top1: float | None
    enforced: bool
    batches: int
    lengths: list[int] = field(default_factory=list)
    measured: float = 0.0
    top1_agreement: float | None = None
    within_tolerance: bool = True
    rounds: int = 0
    # Per step that made a head denser here: site, head, pattern, local_error, model_error_before,
    # top1_before, ``to`` (the pattern it took) and ``refit`` (True: a refit at a higher recall;
    # False: the site's baseline).
    densified: list[dict] = field(default_factory=list)
    unverified_at_seq_len: int | None = None    # the serving length, when no input was that long
    # fp16 / bf16 models: error and top-1 with the verified sites dense in fp32 (verify.py).
    noise_floor: float | None = None
    noise_floor_top1: float | None = None

    @property
    def refitted(self) -> set[tuple[str, int]]:
        """``(site, head)`` of every head a step refitted (records before refits have none)."""
        return {(step["site"], step["head"]) for step in self.densified if step.get("refit")}

    def steps_summary(self) -> str:
        refits = sum(bool(step.get("refit")) for step in self.densified)
        return (f"{len(self.densified)} step(s) of verification made heads denser "
                f"({len(self.densified) - refits} to the baseline, {refits} refitted at a higher recall)")


@dataclass
class SearchRecord(_Record):
    """The search's model-wide record: budget, predicted and measured error, speed, solver."""

    budget: dict
    mode: str
    seq_len: int
    target: str
    cost_profile: dict
    predicted_error: float
    measured_error: float
    held_out_batches: int
    predicted_seconds: float
    dense_seconds: float
    predicted_speedup: float
    attention_seconds: float
    attention_dense_seconds: float
    linears: dict                # searched, sparse, seconds, dense_seconds
    solver: dict
    backoff: list[dict]          # per step: densified, kind, measured_before/after, predicted, ratio
    within_budget: bool
    all_dense_reason: str | None = None


@dataclass
class CostRecord(_Record):
    """The cost model's predicted attention time of the final plan (compile writes it)."""

    target: str
    seq_len: int
    calibrated: bool
    attention_seconds: float
    dense_attention_seconds: float
    predicted_attention_speedup: float


@dataclass
class LinearSearchRecord(_Record):
    """What the search (passes/search.py) decided for one linear."""

    level: float
    predicted_error: float
    measured_error: float | None
    seconds: float
    dense_seconds: float
    speedup: float
    lowering: str                # how the target would run the chosen level
    levels: list[dict]           # per candidate level: level, sensitivity, local_error, seconds, speedup, lowering
    densified_by_backoff: bool


@dataclass
class LinearPlan(_Record):
    """One linear of the model (passes/sparsify_weights.py): whether and how far it is pruned."""

    name: str                    # module path
    node: str                    # fx node name (of the sparse_linear once rewritten)
    weight: str                  # get_attr target of the dense weight
    in_features: int
    out_features: int
    structure: str
    score: str
    comparison: str | None
    level: float = 0.0           # fraction of the weights pruned
    density: float = 1.0
    allocated_by: str | None = None     # "owl", "uniform", "given" or "search"
    outlier_ratio: float | None = None
    # Per level the structure allows: {level, error, cost[, model_error]}.
    candidates: list[dict] = field(default_factory=list)
    error: float = 0.0           # relative L2 change of the linear's output at the chosen level
    measured_contribution: float | None = None
    reason: str = ""             # why the linear is not eligible ("" when it is)
    dense_bytes: int | None = None
    compressed_bytes: int | None = None
    lowering: dict | None = None        # how the target runs the pruned linear
    search: LinearSearchRecord | None = None

    @property
    def eligible(self) -> bool:
        """Whether the linear may be pruned (not excluded, not tied, the structure fits)."""
        return not self.reason


@dataclass
class WeightsRecord(_Record):
    """sparsify_weights' model-wide record: sparsity, output error and bytes of the linears."""

    structure: str
    score: str
    target: float                # the requested global sparsity
    global_sparsity: float
    predicted_error: float | None       # the per-linear contributions combined as independent errors
    measured_error: float        # rel_l2 of the outputs with the weights alone pruned
    dense_bytes: int
    compressed_bytes: int


@dataclass
class Plan(_Record):
    target: str
    version: int = PLAN_VERSION
    recall_threshold: float = 0.95
    attention: list[AttentionSite] = field(default_factory=list)
    linears: list[LinearPlan] = field(default_factory=list)
    unmatched: list[dict] = field(default_factory=list)
    capture: dict = field(default_factory=dict)
    error: dict = field(default_factory=dict)     # measured errors of the final plan, by name
    verification: VerificationRecord | None = None
    search: SearchRecord | None = None
    cost: CostRecord | None = None
    weights: WeightsRecord | None = None
    extra: dict = field(default_factory=dict)     # small model-wide facts (disabled_passes)

    def site(self, name: str) -> AttentionSite:
        for site in self.attention:
            if site.name == name or site.node == name:
                return site
        raise KeyError(f"no attention site named {name!r} in the plan")

    def regroup(self) -> None:
        """:meth:`AttentionSite.regroup` every site."""
        for site in self.attention:
            site.regroup()

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        version = data.get("version")
        if version != PLAN_VERSION:
            raise ArtifactVersionError(
                f"plan version {version!r} is not the version this sparsec reads ({PLAN_VERSION!r}); "
                "recompile the model with this sparsec, or install the sparsec that wrote it")
        return super().from_dict(data)

    @staticmethod
    def from_json(text: str) -> "Plan":
        return Plan.from_dict(json.loads(text))

    def summary(self, file: Any = None) -> str:
        """A table of every head: layer, head, pattern, params, recall, density.

        Printed to ``file`` when given; always returned.
        """
        lines = [f"sparsec plan v{self.version}, target {self.target}, "
                 f"recall threshold {self.recall_threshold}"]
        described = {(site.name, head.head): get_pattern(head.pattern).describe(head.params)
                     for site in self.attention for head in site.heads}
        width = max([len("params"), *map(len, described.values())])
        header = (f"{'layer':>5} {'site':<28} {'head':>4}  {'pattern':<16} {'params':<{width}} "
                  f"{'recall':>7} {'density':>8}")
        lines.append(header)
        lines.append("-" * len(header))
        for site in self.attention:
            for head in site.heads:
                recall = "-" if head.recall is None else f"{head.recall:.3f}"
                density = "-" if head.density is None else f"{head.density:.3f}"
                lines.append(f"{site.layer:>5} {site.name[-28:]:<28} {head.head:>4}  {head.pattern:<16} "
                             f"{described[site.name, head.head]:<{width}} {recall:>7} {density:>8}")
            if site.groups:
                shown = "; ".join(f"{g.pattern}:{g.heads}" for g in site.groups)
                lines.append(f"{'':>5} groups: {shown}")
        for miss in self.unmatched:
            lines.append(f"unmatched {miss.get('node', '?')}: {miss.get('reason', '')}")
        lines.extend(_search_summary(self))
        lines.extend(_weights_summary(self))
        lines.extend(_cost_summary(self))
        lines.extend(_error_summary(self))
        text = "\n".join(lines)
        if file is not None:
            print(text, file=file)
        return text

    def __str__(self) -> str:
        return self.summary()


def _cost_summary(plan: Plan) -> list[str]:
    cost = plan.cost
    if cost is None:
        return []
    return [f"predicted attention speedup {cost.predicted_attention_speedup:.2f}x at N={cost.seq_len} "
            f"on {cost.target} (cost model{'' if cost.calibrated else ', scaled from h100'}: "
            f"{cost.attention_seconds * 1e6:.1f} us vs {cost.dense_attention_seconds * 1e6:.1f} us dense)"]


def _error_summary(plan: Plan) -> list[str]:
    lines = [f"measured error: {key}={value:.3g}" for key, value in plan.error.items() if isinstance(value, float)]
    verification = plan.verification
    if verification:
        top1 = verification.top1_agreement
        lines.append(
            f"verified: {verification.metric}={verification.measured:.3g}"
            + ("" if top1 is None else f", top-1 agreement {top1:.3f}")
            + ("" if verification.noise_floor is None else f", the model's own noise floor "
               f"{verification.noise_floor:.3g} (tolerance above it)")
            + f" at lengths {verification.lengths} (tolerance {verification.metric} <= "
            f"{verification.max_error:g}" + ("" if verification.min_top1 is None
                                             else f", top-1 >= {verification.min_top1:g}")
            + f"; {'within' if verification.within_tolerance else 'OVER'}), "
            f"{verification.steps_summary()}")
    return lines


# -- search: each layer's chosen level and sensitivity --------------------------------------------

def _search_summary(plan: Plan) -> list[str]:
    record = plan.search
    if record is None:
        return []
    lines = [f"search: {record.mode} budget, metric {record.budget['metric']}, "
             f"costs at N={record.seq_len} on {record.target}",
             f"{'layer':>5} {'site':<28} {'level':>5} {'recall':>6} {'sensitivity':>11} {'time us':>9} {'dense us':>9}"]
    for site in plan.attention:
        chosen = site.search
        if chosen:
            lines.append(f"{site.layer:>5} {site.name[-28:]:<28} {chosen.chosen_level:>5} "
                         f"{chosen.chosen_recall:>6.3g} "
                         f"{chosen.sensitivity:>11.3g} {chosen.seconds * 1e6:>9.1f} "
                         f"{chosen.dense_seconds * 1e6:>9.1f}"
                         + ("  (made dense by back-off)" if chosen.densified_by_backoff else ""))
    searched = [entry for entry in plan.linears if entry.search is not None]
    if searched:
        lines.append(f"{'linear':<34} {'level':>5} {'sensitivity':>11} {'measured':>9} {'time us':>9} {'dense us':>9}")
    for entry in searched:
        chosen = entry.search
        measured = "-" if chosen.measured_error is None else f"{chosen.measured_error:.3g}"
        lines.append(f"{entry.name[-34:]:<34} {chosen.level:>5.3g} {chosen.predicted_error:>11.3g} "
                     f"{measured:>9} {chosen.seconds * 1e6:>9.2f} {chosen.dense_seconds * 1e6:>9.2f}"
                     + ("  (made dense by back-off)" if chosen.densified_by_backoff else ""))
    lines.append(f"predicted error {record.predicted_error:.3g}, measured {record.measured_error:.3g} "
                 f"on {record.held_out_batches} held-out batches, predicted speedup "
                 f"{record.predicted_speedup:.2f}x, back-off steps {len(record.backoff)}")
    return lines


def _weights_summary(plan: Plan) -> list[str]:
    record = plan.weights
    if record is None:
        return []
    sparse = sum(entry.level > 0 for entry in plan.linears)
    return [f"weights: {record.structure} ({record.score}), {sparse}/{len(plan.linears)} linears sparse, "
            f"global sparsity {record.global_sparsity:.3f}, rel_l2 of the weights alone "
            f"{record.measured_error:.3g}, {record.compressed_bytes} of {record.dense_bytes} bytes"]


def encode_groups(groups: list[HeadGroup]) -> str:
    """The group table a ``sparse_attention`` node carries (a JSON string)."""
    return json.dumps([{"pattern": g.pattern, "params": g.params, "heads": list(g.heads)}
                       for g in groups], sort_keys=True)


def decode_groups(text: str) -> list[HeadGroup]:
    return [HeadGroup.from_dict(g) for g in json.loads(text)]


@functools.lru_cache(maxsize=256)
def decoded_groups(text: str) -> list[HeadGroup]:
    """:func:`decode_groups`, memoised: the ops decode the same table on every call (callers
    must not modify the result)."""
    return decode_groups(text)
