"""``sparsec inspect DUMP_DIR``: read a pass dump back.

Lists the passes (time, changed or unchanged), prints one pass's graph or decisions,
diffs two passes' graphs, prints the plan summary, and explains one head's decision
(``--head L.H``): the candidates tried, their recall and cost, and why the chosen pattern
won or why the head stayed dense.
"""
from __future__ import annotations

import difflib
import itertools
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from sparsec.ir.errors import SparsecError
from sparsec.patterns import get_pattern
from sparsec.ir.plan import AttentionSite, HeadPlan, Plan

_STEM = re.compile(r"^(\d{3})_(.+)\.json$")


@dataclass
class PassRecord:
    """One pass of a dump: its ``NNN_<pass>.py`` graph and ``NNN_<pass>.json`` record."""

    index: int
    name: str
    seconds: float
    modified: bool
    decisions: object
    graph_path: Path

    @property
    def stem(self) -> str:
        return f"{self.index:03d}_{self.name}"

    def graph(self) -> str:
        """The graph as code, without the dump header."""
        lines = self.graph_path.read_text().splitlines(keepends=True)
        return "".join(itertools.dropwhile(lambda line: line.startswith("# "), lines))


def read_dump(dump_dir: "str | Path") -> list[PassRecord]:
    """Every pass record of a dump directory, in run order."""
    directory = Path(dump_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory; pass the dump_dir / SPARSEC_DUMP "
                                "directory a compile wrote")
    records = []
    for path in sorted(directory.glob("[0-9][0-9][0-9]_*.json")):
        match = _STEM.match(path.name)
        data = json.loads(path.read_text())
        records.append(PassRecord(int(match.group(1)), match.group(2), float(data.get("seconds", 0.0)),
                                  bool(data.get("modified", False)), data.get("decisions"),
                                  path.with_suffix(".py")))
    if not records:
        raise FileNotFoundError(f"{directory} holds no NNN_<pass>.json dumps; compile with "
                                "dump_dir=... or SPARSEC_DUMP=... to write them")
    return records


def find_pass(records: list[PassRecord], key: str) -> PassRecord:
    """A pass by number (``3``), file stem (``003_lower``) or name (``lower``, the last run)."""
    for record in reversed(records):
        if key in (record.stem, record.name, f"{record.stem}.py") or (key.isdigit() and int(key) == record.index):
            return record
    known = ", ".join(r.stem for r in records)
    raise ValueError(f"no pass {key!r} in the dump; passes: {known}")


def pass_table(records: list[PassRecord]) -> str:
    """One line per pass: number, name, time, changed or unchanged."""
    lines = [f"{'#':>3}  {'pass':<20} {'time':>9}  result"]
    for record in records:
        lines.append(f"{record.index:>3}  {record.name:<20} {record.seconds:>8.3f}s  "
                     f"{'changed' if record.modified else 'unchanged'}")
    lines.append(f"{'':>3}  {'total':<20} {sum(r.seconds for r in records):>8.3f}s")
    return "\n".join(lines)


def diff_graphs(before: PassRecord, after: PassRecord) -> str:
    """A unified diff of two passes' graphs (headers left out); says so when they are equal."""
    diff = "".join(difflib.unified_diff(before.graph().splitlines(keepends=True),
                                        after.graph().splitlines(keepends=True),
                                        fromfile=before.graph_path.name, tofile=after.graph_path.name))
    return diff or f"{before.graph_path.name} and {after.graph_path.name}: same graph\n"


def read_plan(dump_dir: "str | Path") -> Plan:
    path = Path(dump_dir) / "plan.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: the compile that wrote this dump did not finish")
    return Plan.from_json(path.read_text())


def find_head(plan: Plan, spec: str) -> tuple[AttentionSite, HeadPlan]:
    """``L.H`` (layer number, head) or ``SITE.H`` (site name, head)."""
    where, _, head_text = spec.rpartition(".")
    if not where or not head_text.isdigit():
        raise ValueError(f"--head {spec!r}: write LAYER.HEAD, e.g. 3.5, or SITE_NAME.HEAD")
    if where.isdigit():
        sites = [s for s in plan.attention if s.layer == int(where)]
        if not sites:
            raise ValueError(f"no attention site at layer {where}; layers: {[s.layer for s in plan.attention]}")
        site = sites[0]
    else:
        try:
            site = plan.site(where)
        except KeyError as error:
            raise ValueError(error.args[0]) from None
    head = int(head_text)
    if head >= len(site.heads):
        raise ValueError(f"layer {site.layer} ({site.name}) has {len(site.heads)} heads; no head {head}")
    return site, site.heads[head]


def _cost(candidate: dict) -> float:
    value = candidate.get("cost", candidate.get("density"))
    return float("inf") if value is None else float(value)


def _same(candidate: dict, head: HeadPlan) -> bool:
    return candidate.get("pattern") == head.pattern and candidate.get("params", {}) == head.params


def _num(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def explain_head(plan: Plan, site: AttentionSite, head: HeadPlan) -> str:
    """Why this head has its pattern: the candidates classification tried and the search's
    ladder, each with recall and cost, against the plan's recall threshold; then the verdict."""
    threshold = plan.recall_threshold
    describe = get_pattern(head.pattern).describe(head.params)
    model_head = site.head_permutation()[head.head]
    group = model_head // max(1, site.num_heads // max(1, site.num_kv_heads))
    moved = f", model head {model_head} before fuse_heads reordered the heads" if model_head != head.head else ""
    lines = [f"layer {site.layer} head {head.head}  (site {site.name}, "
             f"{'causal' if site.effective_causal() else 'bidirectional'}, KV head {group}{moved})",
             f"chosen: {head.pattern} {describe}  recall {_num(head.recall)}  density {_num(head.density)}",
             f"recall threshold: {threshold}  (a pattern must keep at least this fraction of the head's "
             "calibration attention mass)"]
    candidates = sorted(head.candidates, key=_cost)
    lines += _candidate_lines(head, candidates, threshold)
    lines += _search_lines(plan, site, head, model_head)
    lines.append("why: " + _verdict(head, candidates, threshold, searched=site.search is not None))
    return "\n".join(lines)


def _is_dense(candidate: dict) -> bool:
    """Whether a recorded candidate runs plain attention (its family ``computes_all``)."""
    return get_pattern(candidate["pattern"]).computes_all


def _candidate_lines(head: HeadPlan, candidates: list[dict], threshold: float) -> list[str]:
    if not candidates:
        return []
    chosen = next((c for c in candidates if _same(c, head)), None)
    has_cost = any("cost" in c for c in candidates)
    dense_cost = next((c.get("cost") for c in candidates if _is_dense(c)), None)
    lines = ["candidates, cheapest first:",
             f"    {'pattern':<16} {'params':<30} {'recall':>7} {'density':>8}"
             f"{' ' + format('cost' if not dense_cost else 'cost/dense', '>10') if has_cost else ''}  verdict"]
    for candidate in candidates:
        recall = candidate.get("recall")
        if _same(candidate, head):
            verdict = "chosen"
        elif recall is None:
            verdict = "recall not measured"
        elif recall < threshold:
            verdict = f"recall {recall:.3f} < threshold {threshold}"
        elif chosen is not None and _cost(candidate) == _cost(chosen):
            verdict = "meets the threshold, as cheap: lost the tie"
        elif chosen is not None and _cost(candidate) > _cost(chosen):
            verdict = "meets the threshold, costlier than the chosen"
        else:
            verdict = "meets the threshold, cheaper, not chosen (see why)"
        params = get_pattern(candidate["pattern"]).describe(candidate.get("params", {}))
        cost = candidate.get("cost")
        if cost is not None and dense_cost:
            cost /= dense_cost      # FLOPs relative to dense read at a glance; raw values are large
        cost = f" {_num(cost):>10}" if has_cost else ""
        lines.append(f"  {'*' if _same(candidate, head) else ' '} {candidate['pattern']:<16} {params[:30]:<30} "
                     f"{_num(recall):>7} {_num(candidate.get('density')):>8}{cost}  {verdict}")
    return lines


def _search_lines(plan: Plan, site: AttentionSite, head: HeadPlan, model_head: int) -> list[str]:
    """The search's ladder for this head: per recall level, the cheapest fitted pattern that
    is faster than dense (``site.search``, indexed by the model's head order)."""
    record, search = site.search, plan.search
    if not record or not search:
        return []
    levels = search.budget["recall_levels"]
    backoff = ", then back-off made it dense" if record.densified_by_backoff else ""
    lines = [f"search ladder (costs at N={search.seq_len}; the layer took level {record.chosen_level}, "
             f"sensitivity {record.sensitivity:.3g}{backoff}):",
             f"    {'level':>5} {'recall>=':>8}  {'pattern':<16} {'params':<30} {'recall':>7} {'density':>8} "
             f"{'time us':>9}"]
    for level, (target, rung) in enumerate(zip(levels, record.ladder[model_head]), start=1):
        if rung is None:
            lines.append(f"    {level:>5} {target:>8}  (no pattern reaches it faster than dense: dense)")
            continue
        mark = "*" if _same(rung, head) else " "
        params = get_pattern(rung["pattern"]).describe(rung["params"])
        lines.append(f"  {mark} {level:>5} {target:>8}  {rung['pattern']:<16} {params[:30]:<30} "
                     f"{_num(rung['recall']):>7} {_num(rung['density']):>8} {rung['seconds'] * 1e6:>9.1f}")
    return lines


def _verdict(head: HeadPlan, candidates: list[dict], threshold: float, searched: bool) -> str:
    reason = f" ({head.reason})" if head.reason else ""
    if not candidates:
        if searched:
            return f"the layerwise search picked it{reason}; recall threshold {threshold} applies to classification."
        return ("no candidates recorded (the plan was given, not classified, or classification "
                f"did not run); recall threshold {threshold}.{reason}")
    passing = [c for c in candidates if c.get("recall") is not None and c["recall"] >= threshold]
    sparse_passing = [c for c in passing if not _is_dense(c)]
    if head.is_dense:
        if not sparse_passing:
            best = max((c for c in candidates if not _is_dense(c) and c.get("recall") is not None),
                       key=lambda c: c["recall"], default=None)
            best_text = f" (best: {best['pattern']} at recall {best['recall']:.3f})" if best else ""
            return (f"stayed dense: no sparse candidate reached the recall threshold {threshold}"
                    f"{best_text}.{reason}")
        return f"stayed dense although {len(sparse_passing)} candidate(s) met the recall threshold {threshold}.{reason}"
    if passing and _same(passing[0], head):
        return (f"{head.pattern} won: the cheapest candidate whose recall ({_num(head.recall)}) meets the "
                f"recall threshold {threshold}.{reason}")
    return f"{head.pattern} was chosen over cheaper candidates meeting the recall threshold {threshold}.{reason}"


def add_parser(subparsers) -> None:
    """Register ``sparsec inspect``."""
    parser = subparsers.add_parser("inspect", help="read a pass dump: passes, graphs, diffs, plan, one head",
                                   description=__doc__.split("\n\n")[1])
    parser.add_argument("dump_dir", help="directory written by compile(dump_dir=...) or SPARSEC_DUMP")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--graph", metavar="PASS", help="print the graph after PASS (name, number or NNN_name)")
    action.add_argument("--decisions", metavar="PASS", help="print what PASS decided")
    action.add_argument("--diff", nargs=2, metavar=("PASS_A", "PASS_B"), help="diff two passes' graphs")
    action.add_argument("--plan", action="store_true", help="print the plan summary")
    action.add_argument("--head", metavar="L.H", help="explain head H of layer L (or SITE_NAME.H)")
    parser.set_defaults(handler=run)


def run(args) -> int:
    try:
        print(_render(args), end="")
    except (FileNotFoundError, ValueError, SparsecError) as error:
        print(f"sparsec inspect: {error}", file=sys.stderr)
        return 2
    return 0


def _render(args) -> str:
    if args.plan:
        return read_plan(args.dump_dir).summary() + "\n"
    if args.head:
        plan = read_plan(args.dump_dir)
        return explain_head(plan, *find_head(plan, args.head)) + "\n"
    records = read_dump(args.dump_dir)
    if args.graph:
        return find_pass(records, args.graph).graph()
    if args.decisions:
        return json.dumps(find_pass(records, args.decisions).decisions, indent=1) + "\n"
    if args.diff:
        return diff_graphs(find_pass(records, args.diff[0]), find_pass(records, args.diff[1]))
    return pass_table(records) + "\n"
