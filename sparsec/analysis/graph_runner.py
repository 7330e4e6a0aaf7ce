"""One graph interpreter for every analysis that runs a captured graph: calibration, the
search's and verification's suffix runs, and the linears' weight analysis.

A run walks the graph's nodes in order (:class:`torch.fx.Interpreter` evaluates each),
freeing every value after its last use, with three hooks:

- ``observe``: ``{node: fn(node, args, kwargs, result)}`` sees a node's evaluated inputs
  and its result (calibration statistics, a linear's input activations);
- ``replace``: ``{node: fn(node, args, kwargs) -> result}`` computes a node instead of its
  target (a sparse attention site, a linear with a pruned weight);
- a prefix cache: :meth:`GraphRunner.run_and_cache` keeps the values that cross any of the
  runner's ``cut_nodes``, and :meth:`GraphRunner.run_suffix` re-runs only the nodes from
  the first replaced one on.

Inputs reach the graph's placeholders through :func:`flatten_inputs`, the one recipe for
turning a call ``(args, kwargs)`` into them, keyword arguments included.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
import torch.fx
import torch.fx._pytree as fx_pytree

# fn(node, args, kwargs, result): sees a node's evaluated inputs and its result.
NodeObserver = Callable[[torch.fx.Node, tuple, dict, Any], None]
# fn(node, args, kwargs) -> result: computes a node instead of its target.
NodeReplacement = Callable[[torch.fx.Node, tuple, dict], Any]


def flatten_inputs(gm: torch.fx.GraphModule, args: tuple, kwargs: dict | None = None) -> list:
    """The values of ``gm``'s placeholders for a call ``(args, kwargs)``, in placeholder order.

    A captured graph (torch.export) flattens the call with its input spec, as its own
    ``forward`` does. A graph without one (``torch.fx.symbolic_trace``) has one placeholder
    per ``forward`` argument: positional arguments fill the first ones, keyword arguments
    the rest by name, and an argument left out takes the placeholder's default.
    """
    kwargs = dict(kwargs or {})
    info = getattr(gm.graph._codegen, "pytree_info", None)
    if info is not None and info.in_spec is not None:
        return fx_pytree.tree_flatten_spec((tuple(args), kwargs), info.in_spec)
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    if len(args) > len(placeholders):
        raise TypeError(f"the graph takes {len(placeholders)} inputs, the call gives {len(args)} positional ones")
    values = list(args)
    for node in placeholders[len(args):]:
        name = node.target.lstrip("*")
        if name in kwargs:
            values.append(kwargs.pop(name))
        elif node.args:
            values.append(node.args[0])
        else:
            raise TypeError(f"the call gives no value for the graph input {name!r}")
    if kwargs:
        raise TypeError(f"the graph has no inputs named {sorted(kwargs)}")
    return values


def replace_argument(index: int, value: Any) -> NodeReplacement:
    """A replacement computing the node's own target with argument ``index`` set to ``value``
    (a linear with a pruned weight: ``replace_argument(1, pruned)``)."""

    def compute(node: torch.fx.Node, args: tuple, kwargs: dict) -> Any:
        return node.target(*args[:index], value, *args[index + 1:], **kwargs)

    return compute


class GraphRunner:
    """Runs ``gm`` node by node with the hooks of the module docstring.

    ``cut_nodes`` are where suffix runs may start: :meth:`run_and_cache` keeps every value
    computed before one of them and used at or after it, so :meth:`run_suffix` can resume
    there. Every run is under ``torch.no_grad``.
    """

    def __init__(self, gm: torch.fx.GraphModule, cut_nodes: Iterable[torch.fx.Node] = ()):
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self.position = {node: index for index, node in enumerate(self.nodes)}
        self.cut_nodes = set(cut_nodes)
        starts = sorted(self.position[node] for node in self.cut_nodes)
        last_use = {node: max((self.position[user] for user in node.users), default=-1) for node in self.nodes}
        self.crossing = {node for node in self.nodes
                         if any(self.position[node] < start <= last_use[node] for start in starts)}
        # node -> the values whose last use it is, freed once it ran.
        self.frees: dict[torch.fx.Node, list[torch.fx.Node]] = {}
        for node in self.nodes:
            if node.users:
                last_user = max(node.users, key=self.position.__getitem__)
                self.frees.setdefault(last_user, []).append(node)
        self.interpreter = torch.fx.Interpreter(gm, garbage_collect_values=False)

    @torch.no_grad()
    def run(self, args: tuple, kwargs: dict | None = None, *, replace: dict[torch.fx.Node, NodeReplacement] | None = None,
            observe: dict[torch.fx.Node, NodeObserver] | None = None) -> Any:
        """The model's output for one call, with the hooks applied."""
        return self._execute(0, {}, flatten_inputs(self.gm, args, kwargs), replace or {}, observe or {}, keep=())

    @torch.no_grad()
    def run_and_cache(self, args: tuple, kwargs: dict | None = None, *,
                      observe: dict[torch.fx.Node, NodeObserver] | None = None) -> tuple[dict, Any]:
        """The prefix cache (values crossing the cut nodes) and the output of a plain run."""
        env: dict = {}
        output = self._execute(0, env, flatten_inputs(self.gm, args, kwargs), {}, observe or {}, keep=self.crossing)
        return {node: env[node] for node in self.crossing}, output

    @torch.no_grad()
    def run_suffix(self, cache: dict, replace: dict[torch.fx.Node, NodeReplacement],
                   observe: dict[torch.fx.Node, NodeObserver] | None = None) -> Any:
        """The output of a run from the first ``replace`` node on, resuming from ``cache``
        (of :meth:`run_and_cache`); every replaced node must be a cut node."""
        if not replace.keys() <= self.cut_nodes:
            missing = sorted(node.name for node in replace.keys() - self.cut_nodes)
            raise ValueError(f"suffix runs start at cut nodes; {missing} are not among them")
        start = min(self.position[node] for node in replace)
        return self._execute(start, dict(cache), [], replace, observe or {}, keep=())

    def _execute(self, start: int, env: dict, inputs: list, replace: dict, observe: dict, keep) -> Any:
        interpreter = self.interpreter
        interpreter.env, interpreter.args_iter = env, iter(inputs)
        try:
            for node in self.nodes[start:]:
                if node.op == "output":
                    return self.gm.graph._codegen.process_outputs(interpreter.run_node(node))
                if node in replace or node in observe:
                    args, kwargs = interpreter.fetch_args_kwargs_from_env(node)
                    result = replace[node](node, args, kwargs) if node in replace else interpreter.run_node(node)
                    if node in observe:
                        observe[node](node, args, kwargs, result)
                else:
                    result = interpreter.run_node(node)
                env[node] = result
                for value in self.frees.get(node, ()):
                    if value not in keep:
                        env.pop(value, None)
        finally:
            interpreter.env = {}
        raise RuntimeError("the graph has no output node")
