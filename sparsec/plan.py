"""The plan: every decision sparsec made, versioned and JSON-serialisable.

Passes write it, codegen reads it, the runtime loads it, dumps show it. ``to_dict()``
has the shape other tools read::

    {"version", "target", "attention": [{"name", "layer", "num_heads", "num_kv_heads",
      "head_dim", "causal", "heads": [{"head", "pattern", "params", "recall", "density"}],
      "groups": [{"pattern", "params", "heads"}]}], "linears", "unmatched"}
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import ArtifactVersionError
from .patterns import get_pattern

PLAN_VERSION = 1


@dataclass
class HeadPlan:
    head: int
    pattern: str = "dense"
    params: dict = field(default_factory=dict)
    recall: float | None = None
    density: float | None = None
    # Every candidate tried: {"pattern", "params", "recall", "density"}.
    candidates: list[dict] = field(default_factory=list)
    # Why the head took this pattern (e.g. why it stayed dense).
    reason: str = ""


@dataclass
class HeadGroup:
    """Heads of one attention site that run one pattern instance in one launch."""

    pattern: str
    params: dict
    heads: list[int]


@dataclass
class AttentionSite:
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
    extra: dict = field(default_factory=dict)  # later passes' per-site records

    def effective_causal(self) -> bool:
        """The causal flag, or a user mask that calibration found to be exactly causal."""
        return self.causal or bool(self.extra.get("mask_is_causal"))

    def group_heads_by_pattern(self) -> list[HeadGroup]:
        """One group per distinct (pattern, params), heads in ascending order."""
        groups: dict[str, HeadGroup] = {}
        for head in self.heads:
            key = head.pattern + json.dumps(head.params, sort_keys=True)
            groups.setdefault(key, HeadGroup(head.pattern, head.params, []))
            groups[key].heads.append(head.head)
        return list(groups.values())


@dataclass
class Plan:
    target: str
    version: int = PLAN_VERSION
    recall_threshold: float = 0.95
    attention: list[AttentionSite] = field(default_factory=list)
    linears: list[dict] = field(default_factory=list)
    unmatched: list[dict] = field(default_factory=list)
    capture: dict = field(default_factory=dict)
    error: dict = field(default_factory=dict)     # measured error of the final plan
    extra: dict = field(default_factory=dict)     # later passes' model-wide records

    def site(self, name: str) -> AttentionSite:
        for site in self.attention:
            if site.name == name or site.node == name:
                return site
        raise KeyError(f"no attention site named {name!r} in the plan")

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @staticmethod
    def from_dict(data: dict) -> "Plan":
        version = data.get("version")
        if version != PLAN_VERSION:
            raise ArtifactVersionError(
                f"plan version {version!r} is not the version this sparsec reads ({PLAN_VERSION!r}); "
                "recompile the model with this sparsec, or install the sparsec that wrote it")
        sites = []
        for site in data.get("attention", []):
            site = dict(site)
            site["heads"] = [HeadPlan(**h) for h in site.get("heads", [])]
            site["groups"] = [HeadGroup(**g) for g in site.get("groups", [])]
            sites.append(AttentionSite(**site))
        rest = {k: v for k, v in data.items() if k != "attention"}
        return Plan(attention=sites, **rest)

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
    cost = plan.extra.get("cost")
    if not cost:
        return []
    return [f"predicted attention speedup {cost['predicted_attention_speedup']:.2f}x at N={cost['seq_len']} "
            f"on {cost['target']} (cost model{'' if cost['calibrated'] else ', scaled from h100'}: "
            f"{cost['attention_seconds'] * 1e6:.1f} us vs {cost['dense_attention_seconds'] * 1e6:.1f} us dense)"]


def _error_summary(plan: Plan) -> list[str]:
    lines = [f"measured error: {key}={value:.3g}" for key, value in plan.error.items() if isinstance(value, float)]
    verification = plan.error.get("verification")
    if verification:
        top1 = verification.get("top1_agreement")
        lines.append(
            f"verified: {verification['metric']}={verification['measured']:.3g}"
            + ("" if top1 is None else f", top-1 agreement {top1:.3f}")
            + f" at lengths {verification['lengths']} (tolerance {verification['metric']} <= "
            f"{verification['max_error']:g}" + ("" if verification.get("min_top1") is None
                                                 else f", top-1 >= {verification['min_top1']:g}")
            + f"; {'within' if verification['within_tolerance'] else 'OVER'}), "
            f"{len(verification['densified'])} head(s) made dense by verification")
    return lines


# -- search (issue #3): each layer's chosen level and sensitivity --------------------------------

def _search_summary(plan: Plan) -> list[str]:
    record = plan.extra.get("search")
    if not record:
        return []
    lines = [f"search: {record['mode']} budget, metric {record['budget']['metric']}, "
             f"costs at N={record['seq_len']} on {record['target']}",
             f"{'layer':>5} {'site':<28} {'level':>5} {'recall':>6} {'sensitivity':>11} {'time us':>9} {'dense us':>9}"]
    for site in plan.attention:
        chosen = site.extra.get("search")
        if chosen:
            lines.append(f"{site.layer:>5} {site.name[-28:]:<28} {chosen['chosen_level']:>5} "
                         f"{chosen['chosen_recall']:>6.3g} "
                         f"{chosen['sensitivity']:>11.3g} {chosen['seconds'] * 1e6:>9.1f} "
                         f"{chosen['dense_seconds'] * 1e6:>9.1f}"
                         + ("  (made dense by back-off)" if chosen["densified_by_backoff"] else ""))
    searched = [entry for entry in plan.linears if "search" in entry]
    if searched:
        lines.append(f"{'linear':<34} {'level':>5} {'sensitivity':>11} {'measured':>9} {'time us':>9} {'dense us':>9}")
    for entry in searched:
        chosen = entry["search"]
        measured = "-" if chosen["measured_error"] is None else f"{chosen['measured_error']:.3g}"
        lines.append(f"{entry['name'][-34:]:<34} {chosen['level']:>5.3g} {chosen['predicted_error']:>11.3g} "
                     f"{measured:>9} {chosen['seconds'] * 1e6:>9.2f} {chosen['dense_seconds'] * 1e6:>9.2f}"
                     + ("  (made dense by back-off)" if chosen["densified_by_backoff"] else ""))
    lines.append(f"predicted error {record['predicted_error']:.3g}, measured {record['measured_error']:.3g} "
                 f"on {record['held_out_batches']} held-out batches, predicted speedup "
                 f"{record['predicted_speedup']:.2f}x, back-off steps {len(record['backoff'])}")
    return lines


def _weights_summary(plan: Plan) -> list[str]:
    record = plan.extra.get("weights")
    if not record:
        return []
    sparse = sum(entry["level"] > 0 for entry in plan.linears)
    return [f"weights: {record['structure']} ({record['score']}), {sparse}/{len(plan.linears)} linears sparse, "
            f"global sparsity {record['global_sparsity']:.3f}, rel_l2 of the weights alone "
            f"{record['measured_error']:.3g}, {record['compressed_bytes']} of {record['dense_bytes']} bytes"]


def encode_groups(groups: list[HeadGroup]) -> str:
    """The group table a ``sparse_attention`` node carries (a JSON string)."""
    return json.dumps([{"pattern": g.pattern, "params": g.params, "heads": list(g.heads)}
                       for g in groups], sort_keys=True)


def decode_groups(text: str) -> list[HeadGroup]:
    return [HeadGroup(**g) for g in json.loads(text)]
