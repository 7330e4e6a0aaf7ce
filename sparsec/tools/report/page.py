"""The HTML of the plan report: a summary, then per attention site a grid of head cells,
the sensitivity curve and the fused groups. One self-contained file: inline CSS, images
as data URIs, no scripts and no external URLs, so it opens offline."""
from __future__ import annotations

import functools
import html
import json
import math
from dataclasses import dataclass

import torch

from sparsec.patterns import get_pattern
from sparsec.ir.plan import AttentionSite, HeadPlan, Plan
from sparsec.ir.targets import get_target

from sparsec.tools.report.figures import head_heatmap, sensitivity_plot

DEFAULT_LENGTH = 1024  # length at which masks are drawn when no calibration maps are given
DEFAULT_BLOCK = 64     # blocks of a plan whose target is not registered in this process
_BUDGET_SHOWN = ("max_error", "target_speedup", "max_density", "metric", "per_head")

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 0.85em; }
td, th { border: 1px solid #ccc; padding: 2px 8px; text-align: left; }
.summary td:first-child { font-weight: 600; }
.head-grid { display: flex; flex-wrap: wrap; gap: 8px; }
.head-cell { margin: 0; width: 124px; font-size: 0.72em; border: 1px solid #ddd; padding: 4px; }
.head-cell img { width: 112px; height: 112px; image-rendering: pixelated; display: block; }
.head-cell.dense { background: #f4f4f4; } .head-cell.sparse { background: #eef6ee; }
.pattern { font-weight: 600; } .params { color: #555; word-break: break-all; }
.layer-row { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }
.note { color: #666; font-size: 0.85em; }
"""


@dataclass
class BlockMaps:
    """Per-head block-pooled attention mass ``[H, nbq, nbk]`` of one site, and the
    calibration length and block sizes it was pooled at."""

    mass: torch.Tensor | None      # None: no calibration maps, masks only
    n_q: int
    n_k: int
    block_m: int
    block_n: int

    @property
    def grid(self) -> tuple[int, int]:
        return math.ceil(self.n_q / self.block_m), math.ceil(self.n_k / self.block_n)


def block_maps(stats, block_m: int, block_n: int) -> BlockMaps:
    """One site's calibration maps from what ``calibrate`` keeps: an ``AttentionStats``
    (its longest-length profile), one ``AttentionProfile`` (``block_mass``, ``n_q``, ``n_k``,
    square ``block``), or a bare ``[H, nbq, nbk]`` tensor pooled at ``block_m x block_n``."""
    if isinstance(stats, torch.Tensor):
        return BlockMaps(stats, stats.shape[-2] * block_m, stats.shape[-1] * block_n, block_m, block_n)
    profiles = getattr(stats, "profiles", None)
    if profiles:
        stats = profiles[max(profiles, key=lambda shape: (shape[1], shape[0]))]
    return BlockMaps(stats.block_mass, int(stats.n_q), int(stats.n_k), int(stats.block), int(stats.block))


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def predicted_speedup(plan: Plan) -> tuple[float | None, str]:
    """The cost model's speedup of attention (``plan.cost``, else ``plan.search``), else the
    attention FLOP ratio from head densities (an upper bound: no launch overhead)."""
    cost, search = plan.cost, plan.search
    if cost:
        return float(cost.predicted_attention_speedup), f"cost model, attention at N={cost.seq_len}"
    if search:
        return float(search.predicted_speedup), f"cost model, attention at N={search.seq_len}"
    densities = [1.0 if h.density is None or h.is_dense else h.density
                 for site in plan.attention for h in site.heads]
    if not densities:
        return None, ""
    mean = sum(densities) / len(densities)
    return (1.0 / mean if mean > 0 else math.inf), "attention FLOPs from head densities"


def _number(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _summary(plan: Plan) -> str:
    heads = [h for site in plan.attention for h in site.heads]
    sparse = sum(not h.is_dense for h in heads)
    speedup, source = predicted_speedup(plan)
    rows = [("target", plan.target), ("plan version", plan.version),
            ("recall threshold", plan.recall_threshold), ("attention sites", len(plan.attention)),
            ("sparse heads", f"{sparse} / {len(heads)}"),
            ("predicted speedup", "-" if speedup is None else f"{speedup:.2f}x ({source})")]
    search = plan.search
    if search:
        budget = ", ".join(f"{k}={_number(search.budget[k])}" for k in _BUDGET_SHOWN
                           if search.budget.get(k) is not None)
        rows += [("search budget", f"{search.mode}: {budget}"),
                 ("search error", f"predicted {_number(search.predicted_error)}, measured "
                                  f"{_number(search.measured_error)} on {search.held_out_batches} "
                                  f"held-out batches ({'within' if search.within_budget else 'over'} budget)")]
    rows += [(f"verified error: {key}", _number(value)) for key, value in plan.error.items()] \
        or [("verified error", "not measured")]
    verification = plan.verification
    if verification:
        rows += [("verification", f"{verification.metric} {_number(verification.measured)} "
                  f"(tolerance {_number(verification.max_error)}), top-1 {verification.top1_agreement}, "
                  f"lengths {verification.lengths}, {len(verification.densified)} heads made dense"
                  + ("" if verification.noise_floor is None else
                     f", the model's own noise floor {_number(verification.noise_floor)} (tolerance above it)"))]
    body = "".join(f"<tr><td>{_esc(k)}</td><td>{_esc(v)}</td></tr>" for k, v in rows)
    unmatched = "".join(f"<li>{_esc(m.get('node', '?'))}: {_esc(m.get('reason', ''))}</li>"
                        for m in plan.unmatched)
    unmatched = f"<h2>Attention not recognised</h2><ul>{unmatched}</ul>" if unmatched else ""
    return f'<table class="summary">{body}</table>{unmatched}'


@functools.lru_cache(maxsize=4096)
def _block_layout(kind: str, params_json: str, n_q: int, n_k: int, causal: bool, block_m: int,
                  block_n: int) -> torch.Tensor:
    # Heads share pattern instances (that is what fuse_heads groups), so most layouts repeat.
    return get_pattern(kind).block_layout(json.loads(params_json), n_q, n_k, causal, block_m, block_n)


def _layout(site: AttentionSite, head: HeadPlan, maps: BlockMaps) -> torch.Tensor | None:
    if get_pattern(head.pattern).dynamic:
        return None   # the mask is estimated per input: nothing static to outline
    return _block_layout(head.pattern, json.dumps(head.params, sort_keys=True), maps.n_q, maps.n_k,
                         site.effective_causal(), maps.block_m, maps.block_n)


def _head_cell(site: AttentionSite, head: HeadPlan, maps: BlockMaps) -> str:
    layout = _layout(site, head, maps)
    original = site.head_permutation()[head.head]    # calibration maps keep the model's order
    mass = None if maps.mass is None else maps.mass[original]
    if layout is None:
        layout = torch.zeros(maps.grid, dtype=torch.bool)
        note = "dynamic: mask estimated per input"
    else:
        note = ""
    image = head_heatmap(mass, layout)
    kind = "dense" if head.is_dense else "sparse"
    params = get_pattern(head.pattern).describe(head.params)
    title = head.reason or f"{head.pattern} {params}"
    return (f'<figure class="head-cell {kind}" data-layer="{site.layer}" data-head="{head.head}" '
            f'data-pattern="{_esc(head.pattern)}" title="{_esc(title)}">'
            f'<img alt="layer {site.layer} head {head.head}: {_esc(head.pattern)}" src="{image}">'
            f"<figcaption>L{site.layer}.H{head.head}{f' (model head {original})' if original != head.head else ''} "
            f"<span class=\"pattern\">{_esc(head.pattern)}</span><br>"
            f'<span class="params">{_esc(params)}</span><br>'
            f"recall {_fmt(head.recall)} · density {_fmt(head.density)}"
            f'{"<br>" + _esc(note) if note else ""}</figcaption></figure>')


def _sensitivity(site: AttentionSite, metric: str) -> str:
    """The search's per-level record (``site.search``): sensitivity against level."""
    record = site.search
    if not record:
        return '<p class="note">No sensitivity curve: the layerwise search has not run.</p>'
    per_head = bool(record.levels) and isinstance(record.levels[0], list)
    curves = [tuple(zip(*sorted((level["level"], level["sensitivity"]) for level in levels)))
              for levels in (record.levels if per_head else [record.levels])]
    chosen = None if per_head else next(((level["level"], level["sensitivity"]) for level in record.levels
                                         if level["level"] == record.chosen_level), None)
    image = sensitivity_plot(curves, chosen, "search level (0 = dense, higher = sparser)", f"sensitivity ({metric})")
    caption = f"chosen level {record.chosen_level}"
    if chosen is not None:
        density = next(level["density"] for level in record.levels if level["level"] == record.chosen_level)
        caption += f": sensitivity {chosen[1]:.3g}, attention density {density:.3g}"
    if per_head:
        caption += " (per-head search: one curve per head)"
    if record.densified_by_backoff:
        caption += "; made dense again by the back-off"
    return (f'<figure class="sensitivity"><img alt="sensitivity of layer {site.layer}" src="{image}">'
            f"<figcaption>{_esc(caption)}</figcaption></figure>")


def _groups(site: AttentionSite) -> str:
    groups = site.groups or site.instance_groups()
    rows = "".join(f"<tr><td>{_esc(g.pattern)}</td><td>{_esc(get_pattern(g.pattern).describe(g.params))}</td>"
                   f"<td>{_esc(', '.join(map(str, g.heads)))}</td></tr>" for g in groups)
    lowered = site.extra.get("lowered", "")
    caption = f"fused groups ({len(groups)} launch{'es' if len(groups) != 1 else ''})"
    return (f'<table class="groups"><caption>{_esc(caption)}</caption>'
            f"<tr><th>pattern</th><th>params</th><th>heads</th></tr>{rows}</table>"
            f'{f"<p class=note>lowered: {_esc(lowered)}</p>" if lowered else ""}')


def _site(site: AttentionSite, stats, block_m: int, block_n: int, metric: str) -> str:
    if stats is None:
        maps = BlockMaps(None, DEFAULT_LENGTH, DEFAULT_LENGTH, block_m, block_n)
        what = f"no calibration maps: pattern masks at N={maps.n_k}"
    else:
        maps = block_maps(stats, block_m, block_n)
        what = f"calibration attention at N={maps.n_k}, {maps.block_m}x{maps.block_n} blocks, log colour scale"
    cells = "".join(_head_cell(site, head, maps) for head in site.heads)
    attends = "causal" if site.causal else "causal mask" if site.effective_causal() else "bidirectional"
    notes = "".join(f"<li>{_esc(n)}</li>" for n in site.notes)
    return (f'<section class="layer" id="layer-{site.layer}" data-site="{_esc(site.name)}">'
            f"<h2>Layer {site.layer}: {_esc(site.name)}</h2>"
            f'<p class="note">{_esc(site.source or "attention")}, {attends}, '
            f"{site.num_heads} heads / {site.num_kv_heads} KV heads, head_dim {site.head_dim}; {_esc(what)}</p>"
            f'{f"<ul class=note>{notes}</ul>" if notes else ""}'
            f'<div class="head-grid">{cells}</div>'
            f'<div class="layer-row">{_sensitivity(site, metric)}{_groups(site)}</div></section>')


def _target_blocks(plan: Plan) -> tuple[int, int]:
    try:
        target = get_target(plan.target)
    except ValueError:   # a user-registered target, reported in another process
        return DEFAULT_BLOCK, DEFAULT_BLOCK
    return target.block_m, target.block_n


def render_report(plan: Plan, attention_stats: dict | None = None) -> str:
    """The report as one HTML string (see :func:`sparsec.tools.report.write_report`)."""
    block_m, block_n = _target_blocks(plan)
    attention_stats = attention_stats or {}
    metric = plan.search.budget["metric"] if plan.search else "error"
    sites = "".join(_site(site, attention_stats.get(site.name), block_m, block_n, metric) for site in plan.attention)
    legend = ("Each head: block-pooled calibration attention mass (brighter = more), the blocks its "
              "chosen pattern computes outlined in red.")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f"<title>sparsec plan report ({_esc(plan.target)})</title><style>{_CSS}</style></head>"
            f"<body><h1>sparsec plan report</h1>{_summary(plan)}<p class=\"note\">{legend}</p>"
            f"{sites}</body></html>\n")
