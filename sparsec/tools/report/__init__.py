"""The plan report: one self-contained ``report.html`` showing what the compiler did.

Per attention site, a grid of heads (each a heatmap of its block-pooled calibration
attention with the chosen pattern's blocks outlined, and its pattern, params, recall and
density), the layer's sensitivity curve and chosen level when the search ran
(``site.search``), the fused groups; and for the model the predicted speedup and
the verified error. Written at the end of a dumped compile and by ``CompiledModel.report``.
"""
from __future__ import annotations

from pathlib import Path

from sparsec.ir.plan import Plan

from sparsec.tools.report.page import BlockMaps, block_maps, predicted_speedup, render_report

__all__ = ["BlockMaps", "block_maps", "predicted_speedup", "render_report", "write_report"]


def write_report(plan: Plan, attention_stats: dict | None, path: "str | Path") -> Path:
    """Write the HTML report of ``plan`` to ``path`` and return it.

    ``attention_stats`` maps a site name to its calibration statistics (``ctx.attention_stats``:
    ``AttentionStats`` or ``AttentionProfile``, whose ``block_mass`` is drawn) or to a bare
    ``[H, nbq, nbk]`` tensor of block-pooled attention mass at the target's blocks; sites
    without an entry are drawn as pattern masks only.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(plan, attention_stats), encoding="utf-8")
    return path
