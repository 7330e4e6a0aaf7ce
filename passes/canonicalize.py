"""canonicalize: rewrite every recognised attention into one ``sparsec.attention`` node.

(Matchers for SDPA and the eager form are being added; for now the pass registers the
``sparsec.attention`` nodes already in the graph as plan sites.)
"""
from __future__ import annotations

import torch

from sparsec.errors import NoAttentionError
from sparsec.pass_manager import CompileContext, PassResult

from .attention_sites import register_sites


class Canonicalize:
    name = "canonicalize"

    def run(self, gm: torch.fx.GraphModule, ctx: CompileContext) -> PassResult:
        ctx.plan.attention = register_sites(gm)
        if not ctx.plan.attention:
            raise NoAttentionError(
                "no attention found in the captured graph. sparsec recognises "
                "F.scaled_dot_product_attention and the eager softmax(q @ k^T) @ v form; "
                "see plan.unmatched for near misses, or call torch.ops.sparsec.attention directly")
        return PassResult(gm, False, {"attention_sites": len(ctx.plan.attention)})
