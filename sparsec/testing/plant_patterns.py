"""A pass that stands in for calibration and classification: it gives heads fixed patterns.

Tests and benchmarks use it to compile a model with a known plan without calibrating.
"""
from __future__ import annotations


from sparsec.passes.infra.pass_manager import PassResult


class PlantPatterns:
    """Site ``i`` takes ``layers[i % len(layers)]``: ``{head: (kind, params)}`` or a list of
    ``(kind, params)`` per head. Heads not named take ``default`` when given, else stay as
    they are (dense)."""

    name = "plant_patterns"

    def __init__(self, layers: list, default: tuple[str, dict] | None = None):
        self.layers = layers
        self.default = default

    def run(self, gm, ctx):
        planted = 0
        for index, site in enumerate(ctx.plan.attention):
            chosen = self.layers[index % len(self.layers)] if self.layers else {}
            chosen = dict(enumerate(chosen)) if isinstance(chosen, list) else chosen
            for head in site.heads:
                pattern = chosen.get(head.head, self.default)
                if pattern is not None:
                    head.assign(pattern[0], pattern[1], "planted by a test")
                    planted += 1
            site.regroup()
        return PassResult(gm, False, {"planted": planted})
