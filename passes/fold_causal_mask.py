"""fold_causal_mask: replace an in-graph causal or sliding-window mask by ``causal=True``.

Hugging Face models build their mask inside the graph (an N×N boolean or additive tensor)
instead of passing ``is_causal``; kept, it costs O(N²) memory and makes every kernel read
mask tiles. A site's mask is replaced only when it is *provably* the same structure at
every length, decided from the graph, never from what calibration happened to see
(a Mistral sliding window of 8 looks causal on 6-token calibration inputs):

1. it is a function of input *shapes* only: walking its producers reaches no input tensor
   except through ``sym_size`` (so padding masks, which read ``attention_mask``, are never
   replaced);
2. its producer subgraph, evaluated here at probe lengths chosen from the graph — small
   lengths, the calibration lengths, ``c - 1, c, c + 1, 2c + 1`` for every integer
   constant ``c`` of the subgraph (a window size appears as one) and one length past the
   largest — is exactly the causal mask (fold: ``causal=True``, no mask), or exactly a
   causal sliding window of one fixed width ``w`` at all of them (``0 <= d < w`` with
   ``d`` base.py's offset; Hugging Face's ``q - sliding_window < k <= q`` is
   ``w = sliding_window``).

A window site becomes ``causal=True`` plus sparsec's ``window`` pattern of width ``w``
(fixed, not elastic) on every head, and is lowered here, at once, to a
``sparsec.sparse_attention`` node: its heads must never run dense (without the mask a
dense head would attend outside the model's window), and passes that re-decide heads
(search, verify, fuse_heads, lower) only touch ``sparsec.attention`` nodes. The site
records ``extra["model_window"] = w``; :func:`sparsec.patterns.base.baseline_pattern` is
the least sparse pattern a head of such a site may take (``window(w)``; ``dense``
elsewhere). Sites that fail either check keep their mask; the plan says why.
"""
from __future__ import annotations

import torch
from torch.fx.node import map_arg

from sparsec.passes.infra.pass_manager import CompileContext, PassResult
from sparsec.patterns.base import MASKED_ADDITIVE, MODEL_WINDOW, baseline_pattern, offsets

from sparsec.passes.lower import lower_site

SHAPE_ONLY_TARGETS = (torch.ops.aten.sym_size.int,)
# Probe lengths: these small ones always, and a few past every integer constant.
SMALL_LENGTHS = (1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 33)
# Integer constants at or above this are "no limit" sentinels (slice ends), not sizes.
SENTINEL = 2**31 - 1
# Longest probe: a mask whose subgraph holds a constant needing a longer probe is kept
# (a window of 2**14 keys could not be told from causal by shorter probes).
MAX_PROBE_LENGTH = 1 << 14


class _Unprovable(Exception):
    """The mask's structure could not be established at every length."""


def _ancestors(mask: torch.fx.Node) -> set[torch.fx.Node]:
    """The nodes ``mask`` is computed from, walking through every node but ``sym_size``
    (a shape read: its input's values do not matter)."""
    stack, seen = [mask], set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if not (node.op == "call_function" and node.target in SHAPE_ONLY_TARGETS):
            stack.extend(node.all_input_nodes)
    return seen


def _reads_input_values(mask: torch.fx.Node) -> str | None:
    """The first input placeholder whose values the mask depends on, or None."""
    return min((node.name for node in _ancestors(mask) if node.op == "placeholder"), default=None)


def _producers(gm: torch.fx.GraphModule, mask: torch.fx.Node) -> list[torch.fx.Node]:
    """The nodes computing ``mask`` from shapes, in graph order (``sym_size`` nodes are leaves)."""
    seen = _ancestors(mask)
    return [n for n in gm.graph.nodes if n in seen]


def _symbols(value) -> set:
    """Free symbols of a SymInt (or an int: none)."""
    return set(value.node.expr.free_symbols) if isinstance(value, torch.SymInt) else set()


def _length_symbols(mask: torch.fx.Node) -> set:
    """The symbols of the mask's last two (query, key) dimensions: the sequence lengths."""
    shape = mask.meta["val"].shape
    return set().union(*(_symbols(size) for size in shape[-2:]))


def _integer_constants(gm: torch.fx.GraphModule, nodes: list[torch.fx.Node]) -> set[int]:
    """Integer constants the mask's subgraph computes with: node arguments and small tensor
    constants (a window size is one of them)."""
    found: set[int] = set()

    def visit(value):
        if isinstance(value, bool):
            return
        if isinstance(value, int):
            found.add(abs(value))
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)

    for node in nodes:
        visit(node.args)
        visit(node.kwargs)
        if node.op == "get_attr":
            tensor = _attribute(gm, node.target)
            if isinstance(tensor, torch.Tensor) and tensor.numel() <= 16 and not tensor.is_floating_point():
                visit(tensor.flatten().tolist())
    return {c for c in found if c < SENTINEL}


def _attribute(gm: torch.fx.GraphModule, target: str):
    value = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


def probe_lengths(constants: set[int], calibration: set[int]) -> list[int]:
    """Lengths at which a shape-only mask is evaluated: small ones, the calibration lengths,
    and ``c - 1, c, c + 1, 2c + 1`` for every constant ``c`` (``2c + 1`` of the largest is
    the length well past every constant; without constants, one past the small lengths)."""
    lengths = set(SMALL_LENGTHS) | set(calibration)
    for c in constants:
        lengths |= {c - 1, c, c + 1, 2 * c + 1}
    if not constants:
        lengths.add(2 * max(SMALL_LENGTHS) + 17)     # 2c + 1 is already past every constant c
    return sorted(n for n in lengths if n >= 1)


def _evaluate(gm: torch.fx.GraphModule, nodes: list[torch.fx.Node], mask: torch.fx.Node,
              values: dict) -> torch.Tensor:
    """The mask's value when every length symbol takes ``values[symbol]`` (others: 1)."""
    env: dict[torch.fx.Node, object] = {}
    for node in nodes:
        if node.op == "call_function" and node.target in SHAPE_ONLY_TARGETS:
            expr = node.meta["val"]
            if isinstance(expr, torch.SymInt):
                expr = expr.node.expr
                env[node] = int(expr.subs({s: values.get(s, 1) for s in expr.free_symbols}))
            else:
                env[node] = int(expr)
        elif node.op == "get_attr":
            env[node] = _attribute(gm, node.target)
        elif node.op == "call_function":
            args = map_arg(node.args, lambda n: env[n])
            kwargs = map_arg(node.kwargs, lambda n: env[n])
            env[node] = node.target(*args, **kwargs)
        else:
            raise _Unprovable(f"its producers include a {node.op} node ({node.name})")
    return env[mask]


def _window_of(mask: torch.Tensor) -> int:
    """The width ``w`` with ``mask`` exactly ``0 <= d < w`` at every batch and head (``w`` =
    ``n_k`` or more for the causal mask), else raises."""
    n_q, n_k = mask.shape[-2:]
    d = offsets(torch.arange(n_q, device=mask.device), torch.arange(n_k, device=mask.device), n_q, n_k)
    if mask.dtype == torch.bool:
        allowed = mask
    else:
        allowed = mask > MASKED_ADDITIVE
        if not bool((mask.masked_fill(~allowed, 0) == 0).all()):
            raise _Unprovable("its additive values are not 0 where it attends (a bias)")
    if not bool(allowed.any()):
        raise _Unprovable("it masks every key")
    width = int(d.expand_as(allowed)[allowed].max()) + 1
    if not bool((allowed == ((d >= 0) & (d < width))).all()):
        raise _Unprovable(f"at length {n_k} it is neither causal nor a causal sliding window")
    return width


def mask_structure(gm: torch.fx.GraphModule, mask: torch.fx.Node, calibration_lengths: set[int]) -> int | None:
    """For a shape-only mask: ``None`` when it is the causal mask at every probe length, the
    window width ``w`` when it is the causal sliding window ``0 <= d < w`` at all of them;
    raises :class:`_Unprovable` otherwise (see the module docstring)."""
    nodes = _producers(gm, mask)
    symbols = _length_symbols(mask)
    constants = _integer_constants(gm, nodes)
    if symbols:
        lengths = probe_lengths(constants, calibration_lengths)
        if lengths[-1] > MAX_PROBE_LENGTH:
            raise _Unprovable(f"it holds the constant {max(constants)}, past the longest probe "
                              f"length {MAX_PROBE_LENGTH}")
    else:
        lengths = [0]          # static shapes: the one length the graph serves
    windows = []
    for length in lengths:
        try:
            value = _evaluate(gm, nodes, mask, {s: length for s in symbols})
        except _Unprovable:
            raise
        except Exception as error:        # an op that does not run on concrete values
            raise _Unprovable(f"its producers could not be evaluated at length {length}: {error}") from error
        windows.append((value.shape[-2], value.shape[-1], _window_of(value)))
    cut = [w for _n_q, n_k, w in windows if w < n_k]        # lengths where it is not causal
    if not cut:
        return None
    width = min(cut)
    for _n_q, n_k, w in windows:
        # Causal at a length (w = n_k) is the window there only when n_k <= width.
        if (w < n_k and w != width) or (w >= n_k and n_k > width):
            raise _Unprovable(f"its window width changes with the length ({width} and {min(w, n_k)})")
    return width


class FoldCausalMask:
    name = "fold_causal_mask"

    def run(self, gm: torch.fx.GraphModule, ctx: CompileContext) -> PassResult:
        nodes = {n.name: n for n in gm.graph.nodes}
        folded, windows, decisions = 0, 0, {}
        stats = ctx.attention_stats or {}
        # Hugging Face builds one mask per kind and passes it to every layer: probe it once.
        structures: dict[tuple, int | None | _Unprovable] = {}
        for site in ctx.plan.attention:
            node = nodes.get(site.node)
            if node is None or not site.has_mask:
                continue
            mask = node.args[3]
            source = _reads_input_values(mask)
            if source is not None:
                decisions[site.name] = f"kept: the mask depends on the values of input {source!r} (padding)"
                site.notes.append(f"mask kept as a tensor: it reads input {source!r}")
                continue
            calibrated = set(stats[site.name].lengths) if site.name in stats else set()
            key = (mask, tuple(sorted(calibrated)))
            if key not in structures:
                try:
                    structures[key] = mask_structure(gm, mask, calibrated)
                except _Unprovable as why:
                    structures[key] = why
            width = structures[key]
            if isinstance(width, _Unprovable):
                decisions[site.name] = f"kept: {width}"
                site.notes.append(f"mask kept as a tensor: {width}")
                continue
            node.args = (*node.args[:3], None, node.args[4], True)
            site.causal, site.has_mask = True, False
            if width is None:
                site.notes.append("in-graph causal mask folded into causal=True (causal at every probed length)")
                decisions[site.name] = "folded"
                folded += 1
                continue
            site.extra[MODEL_WINDOW] = width
            self._lower_window(gm, node, site)
            site.notes.append(f"in-graph sliding-window mask (width {width}) replaced by causal=True and the "
                              f"window pattern on every head; the site is lowered here so no later pass "
                              f"runs its heads dense (outside the model's window)")
            decisions[site.name] = f"sliding window {width}: causal=True + window({width}) on every head"
            windows += 1
        if folded or windows:
            gm.graph.eliminate_dead_code()
        return PassResult(gm, folded + windows > 0, {"masks_folded": folded, "model_windows": windows}, decisions)

    @staticmethod
    def _lower_window(gm: torch.fx.GraphModule, node: torch.fx.Node, site) -> None:
        """Replace the site's ``sparsec.attention`` node by a ``sparse_attention`` node whose
        single group runs the model's window on every head."""
        kind, params = baseline_pattern(site)
        for head in site.heads:
            head.assign(kind, params, f"the model's own sliding window ({site.extra[MODEL_WINDOW]} keys): fixed")
        site.regroup()
        lower_site(gm, node, site)
        site.extra["lowered"] = f"sparse_attention, the model's window({site.extra[MODEL_WINDOW]}), 1 launch"
