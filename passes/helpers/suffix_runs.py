"""Suffix runs of a captured graph with some attention sites sparse and some linears pruned:
what the search and verification measure a plan with.

Built on :class:`sparsec.analysis.graph_runner.GraphRunner`; this module adds how an
overridden node is computed: an attention site by sparse attention with the given head
groups, a linear with the given (pruned) weight.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from sparsec.analysis.graph_runner import GraphRunner, NodeReplacement, replace_argument
from sparsec.ir.plan import HeadGroup, encode_groups
from sparsec.ir import reference

# An override of one node: an attention site's head groups, or a linear's replacement weight.
Override = list[HeadGroup] | torch.Tensor


def sparse_site(groups: list[HeadGroup]) -> NodeReplacement:
    """A replacement computing an attention site with ``groups`` by sparse attention."""

    def compute(node: torch.fx.Node, args: tuple, kwargs: dict) -> torch.Tensor:
        # CPU tensors: the op, i.e. the block-sparse kernel the compiled model runs there
        # (equal to the reference up to rounding, tests/test_cpu_sparse_attention.py); other
        # devices: the reference, so that a search compiles no kernels.
        if args[0].device.type == "cpu":
            return torch.ops.sparsec.sparse_attention(*args[:6], encode_groups(groups))
        return reference.sparse_attention(*args[:6], groups)

    return compute


class SuffixRunner:
    """Runs ``gm`` with chosen attention sites sparse and chosen linears with replaced
    weights. A dense run caches the values that cross any of ``site_nodes``, so a later
    run with some of them changed re-runs only the nodes from the first changed one on."""

    def __init__(self, gm: torch.fx.GraphModule, site_nodes: list[torch.fx.Node]):
        self.runner = GraphRunner(gm, site_nodes)

    def dense(self, call: tuple[tuple, dict]) -> tuple[dict, Any]:
        """Cached values and the output of a dense run of one ``(args, kwargs)`` call."""
        return self.runner.run_and_cache(*call)

    def dense_runs(self, calls: list, earlier: list | None) -> list[tuple[dict, Any]]:
        """:meth:`dense` of every call, or ``earlier`` runs of the same calls (a pass's, on the
        graph as it was) where their caches hold every value this runner's suffixes need."""
        if earlier is not None and len(earlier) == len(calls) and \
                all(self.runner.crossing <= cache.keys() for cache, _ in earlier):
            return earlier
        return [self.dense(call) for call in calls]

    def run_replaced(self, cache: dict, replace: dict[torch.fx.Node, NodeReplacement]) -> Any:
        """The output with each ``replace`` node computed by its own function instead."""
        return self.runner.run_suffix(cache, replace, {})

    def run(self, cache: dict, overrides: dict[torch.fx.Node, Override], observe: Callable | None = None) -> Any:
        """The output with each ``overrides`` site computed with its head groups, and each
        overridden linear with its replacement weight. ``observe(node, args, output)`` sees
        every overridden attention site's inputs and sparse output."""
        replace, watch = {}, {}
        for node, override in overrides.items():
            if isinstance(override, torch.Tensor):
                replace[node] = replace_argument(1, override)
            else:
                replace[node] = sparse_site(override)
                if observe is not None:
                    watch[node] = lambda node, args, kwargs, output: observe(node, args, output)
        return self.runner.run_suffix(cache, replace, watch)
