"""Find the canonical ``sparsec.attention`` nodes of a graph and describe them as plan sites."""
from __future__ import annotations

import torch

from sparsec.ir.errors import UnsupportedDtypeError
from sparsec.ir.ops import SUPPORTED_DTYPES
from sparsec.ir.plan import AttentionSite, HeadPlan

ATTENTION = torch.ops.sparsec.attention.default
SPARSE_ATTENTION = torch.ops.sparsec.sparse_attention.default


def attention_nodes(gm: torch.fx.GraphModule, target=ATTENTION) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == target]


def module_path(node: torch.fx.Node) -> str:
    """The dotted path of the module the node was traced in (``layers.0.self_attn``)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return node.name
    path, _cls = list(stack.values())[-1]
    return path or node.name


def _shape(node: torch.fx.Node) -> tuple:
    return tuple(node.meta["val"].shape)


def describe_site(node: torch.fx.Node, layer: int, name: str, source: str) -> AttentionSite:
    q, k, _v, mask, _scale, causal = node.args
    dtype = q.meta["val"].dtype
    if dtype not in SUPPORTED_DTYPES:
        raise UnsupportedDtypeError(
            f"attention {name} computes in {dtype}; sparsec attention supports float16, bfloat16 "
            "and float32 — cast the model (model.to(torch.float32) or torch.bfloat16) before compiling")
    num_heads, head_dim = _shape(q)[1], _shape(q)[3]
    return AttentionSite(
        name=name, layer=layer, num_heads=int(num_heads), num_kv_heads=int(_shape(k)[1]),
        head_dim=int(head_dim), causal=bool(causal), node=node.name, source=source,
        has_mask=mask is not None, heads=[HeadPlan(head=h) for h in range(int(num_heads))])


def register_sites(gm: torch.fx.GraphModule, sources: dict[str, str] | None = None) -> list[AttentionSite]:
    """One site per ``sparsec.attention`` node, in graph order; ``sources`` maps node names
    to the form that was recognised (default ``"sparsec.attention"``)."""
    sites, seen = [], {}
    for layer, node in enumerate(attention_nodes(gm)):
        name = module_path(node)
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            name = f"{name}#{seen[name] - 1}"
        source = (sources or {}).get(node.name, "sparsec.attention")
        sites.append(describe_site(node, layer, name, source))
    return sites
