"""Sparse prefill inside Hugging Face generation: ``sparsec.attach(model, plan)``.

``model.generate()`` prefills a prompt once, then decodes one token at a time against the KV
cache. Hugging Face models built on the ``AttentionInterface`` registry call
``ALL_ATTENTION_FUNCTIONS[config._attn_implementation](module, query, key, value,
attention_mask, scaling=..., **kwargs)`` after the cache update, so one registered function
sees every layer's query and its whole cached key/value. :func:`attach` registers such a
function and binds each plan site to its attention module (by module identity, found by the
module path the plan recorded): no model class is edited, and the model keeps its own cache.

- **Prefill** (more than ``decode_max_queries`` queries) runs the site's head groups through
  ``torch.ops.sparsec.sparse_attention`` (Triton kernels on CUDA, block-sparse on the CPU)
  with the model's own mask (padding, sliding window). Patterns are aligned bottom-right
  (:mod:`sparsec.patterns.base`): a chunk of ``n_q`` queries against ``n_k`` cached + new
  keys gets the same offsets as the end of a one-shot prefill, so chunked prefill is exact.
- **Decode** runs the model's previous implementation (dense) by default; with
  ``decode="sparse"``, heads whose pattern reads only part of the cache (``window``,
  ``sink_window``) keep it, the rest run dense.
- Anything the plan does not cover (sites it left unmatched, soft-capping, attention sinks,
  training-mode dropout) runs the previous implementation.
"""
from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass
from typing import Callable

import torch

from sparsec.errors import InvalidArgumentError, UnservableInputError
from sparsec.patterns.base import MASKED_ADDITIVE
from sparsec.plan import AttentionSite, HeadGroup, Plan, encode_groups, group_heads

DECODE_MODES = ("dense", "sparse")
# Patterns that read only a bounded part of the cache for one query: worth keeping at decode.
CHEAP_AT_DECODE = ("window", "sink_window")
# The implementations whose masks the sparse path reads (4-D boolean / additive, or None).
WRAPPABLE = ("sdpa", "eager")
# Attention arguments sparse_attention has no equivalent for: such calls run the previous implementation.
_UNSUPPORTED_KWARGS = ("softcap", "s_aux", "sinks", "position_bias")


@dataclass(frozen=True)
class _SiteRunner:
    """One attention module's plan: its group tables for prefill and (optionally) decode."""

    site: str
    num_heads: int
    causal: bool
    prefill_groups: str
    decode_groups: str | None          # None: decode runs the previous implementation
    decode_max_queries: int

    def groups_for(self, num_queries: int) -> str | None:
        return self.prefill_groups if num_queries > self.decode_max_queries else self.decode_groups


# Attention module -> its runner, for every attached model (weak: a dropped model leaves no entry).
_RUNNERS: "weakref.WeakKeyDictionary[torch.nn.Module, _SiteRunner]" = weakref.WeakKeyDictionary()


def model_order_groups(site: AttentionSite) -> list[HeadGroup]:
    """The site's head groups in the model's own head order, one per pattern instance.

    ``fuse_heads`` permutes the compiled model's q/k/v/o weights so that groups are
    contiguous; a live Hugging Face model keeps its weights and cache unpermuted, so the
    permutation is undone here (groups by instance may be more than the compiled launches)."""
    return group_heads(site.heads_in_model_order())


def _decode_groups(groups: list[HeadGroup]) -> list[HeadGroup]:
    """Groups for ``decode="sparse"``: patterns cheap at decode kept, every other head dense."""
    kept = [g for g in groups if g.pattern in CHEAP_AT_DECODE]
    dense = sorted(h for g in groups if g.pattern not in CHEAP_AT_DECODE for h in g.heads)
    return kept + ([HeadGroup("dense", {}, dense)] if dense else [])


def _modules_by_site(model: torch.nn.Module, plan: Plan) -> dict[str, torch.nn.Module]:
    """Each plan site's module: the module at the path capture recorded, or the one module
    whose path ends with it or ends it (a plan compiled on ``model.model``, or on a wrapper
    of the model, attached to the model)."""
    modules = dict(model.named_modules())
    found = {}
    for site in plan.attention:
        if "#" in site.name:
            raise InvalidArgumentError(
                f"plan site {site.name!r} is a second attention inside one module; attach binds one plan "
                "entry per attention module, so it cannot run this plan (compile the model whose modules "
                "each run one attention)")
        module = modules.get(site.name)
        if module is None:
            matches = [m for path, m in modules.items()
                       if path and (path.endswith("." + site.name) or site.name.endswith("." + path))]
            module = matches[0] if len(matches) == 1 else None
        if module is None:
            raise InvalidArgumentError(
                f"plan site {site.name!r} names no module of this model; attach the plan to the model it "
                "was compiled from (plan site names are module paths, e.g. model.layers.0.self_attn)")
        found[site.name] = module
    return found


def _keys_in_use(mask: torch.Tensor) -> int:
    """Keys up to the last one the last query may attend: a static cache hands over all its
    slots, the empty ones masked; patterns count offsets from the last key, so they go."""
    last_row = mask[..., -1, :]
    kept = last_row if last_row.dtype == torch.bool else last_row > MASKED_ADDITIVE
    columns = kept.reshape(-1, kept.shape[-1]).any(dim=0).nonzero()
    return int(columns.max()) + 1 if len(columns) else mask.shape[-1]


def sparse_prefill(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                   scale: float, causal: bool, groups: str) -> torch.Tensor:
    """``[B, Hq, n_q, D]`` attention of ``groups`` (a JSON group table) over cached + new keys
    ``[B, Hkv, n_k, D]`` with the model's mask (None, 4-D boolean or additive), read as
    Hugging Face's SDPA integration reads it. Returns ``[B, Hq, n_q, D]``."""
    n_q = query.shape[2]
    if mask is not None:
        mask = mask[..., : key.shape[2]]
        if key.shape[2] > n_q:
            used = _keys_in_use(mask)
            key, value, mask = key[:, :, :used], value[:, :, :used], mask[..., :used]
    elif causal and 1 < n_q < key.shape[2]:
        # No mask and more keys than queries: an empty static cache's prefill, whose keys
        # past the queries are empty slots (SDPA's top-left is_causal, as transformers uses it).
        key, value = key[:, :, :n_q], value[:, :, :n_q]
    if n_q != key.shape[2]:
        # The op's causal flag is SDPA's (top-left); after a cache the model's mask carries
        # the bottom-right cut (a single query needs none).
        causal = False
    return torch.ops.sparsec.sparse_attention(query, key, value, mask, scale, causal, groups)


def _previous_function(module: torch.nn.Module, previous: str) -> Callable:
    """The implementation the model ran before attach: eager is each modeling file's own
    ``eager_attention_forward`` (Gemma's soft-caps), the others come from the registry."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if previous == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[previous]


def _attention_function(previous: str) -> Callable:
    """The registered function for models whose previous implementation is ``previous``."""

    def sparsec_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        runner = _RUNNERS.get(module)
        groups = None if runner is None else runner.groups_for(query.shape[2])
        unsupported = (dropout > 0.0 or kwargs.get("output_attentions")
                       or any(kwargs.get(name) is not None for name in _UNSUPPORTED_KWARGS))
        if groups is None or unsupported:
            return _previous_function(module, previous)(module, query, key, value, attention_mask,
                                                        scaling=scaling, dropout=dropout, **kwargs)
        if query.shape[1] != runner.num_heads:
            raise UnservableInputError(
                f"{runner.site} runs {query.shape[1]} query heads, its plan {runner.num_heads}; attach the "
                "plan compiled from this model")
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        out = sparse_prefill(query, key, value, attention_mask, scale, runner.causal, groups)
        return out.transpose(1, 2).contiguous(), None

    sparsec_attention.__name__ = f"sparsec_attention_over_{previous}"
    return sparsec_attention


def _register(previous: str) -> str:
    """Register ``sparsec_<previous>`` (attention and mask functions); returns the name."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    name = f"sparsec_{previous}"
    AttentionInterface.register(name, _attention_function(previous))
    # The model's masks stay those of its previous implementation (the sparse path reads them).
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[previous])
    return name


class Attachment:
    """What :func:`attach` did to a model; :meth:`detach` undoes it."""

    def __init__(self, model: torch.nn.Module, previous: str, name: str, runners: dict[torch.nn.Module, _SiteRunner]):
        self.model = model
        self.previous = previous
        self.implementation = name
        self.runners = runners

    @property
    def sites(self) -> list[str]:
        """The plan sites bound to a module of the model."""
        return [runner.site for runner in self.runners.values()]

    def detach(self) -> None:
        """Unbind the plan and restore the model's previous attention implementation."""
        for module in self.runners:
            _RUNNERS.pop(module, None)
        self.runners = {}
        self.model.set_attn_implementation(self.previous)

    def __enter__(self) -> "Attachment":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()


def attach(model: torch.nn.Module, plan_or_compiled, *, decode: str = "dense",
           decode_max_queries: int = 1) -> Attachment:
    """Run ``model`` (a Hugging Face ``PreTrainedModel``) with sparsec's plan at prefill:
    ``model(**inputs)`` and ``model.generate(...)`` work as before, KV cache and all.

    Registers ``sparsec_<previous>`` with ``transformers.AttentionInterface`` (the model's
    previous implementation, ``sdpa`` or ``eager``, serves whatever the plan does not cover
    and the masks) and binds each plan site to its attention module by identity. No model
    class is edited; ``Attachment.detach()`` (or a ``with`` block) restores the model.

    Head groups are the plan's per-head patterns in the **model's own head order**, one
    group per pattern instance: ``fuse_heads``' head permutation lives in the compiled
    model's copied weights and is not applied to the live model, whose weights and cache stay
    as they are (so a site may launch more groups than the compiled model does).

    Args:
        model: the model the plan was compiled from (its modules are found by the paths the
            plan recorded).
        plan_or_compiled: a :class:`~sparsec.plan.Plan` or a :class:`~sparsec.CompiledModel`.
        decode: ``"dense"`` (decode runs the previous implementation) or ``"sparse"``
            (``window`` / ``sink_window`` heads keep their pattern at decode, others dense).
        decode_max_queries: calls with at most this many queries are decode (speculative
            decoding verifies a few); longer ones are prefill.
    """
    plan = getattr(plan_or_compiled, "plan", plan_or_compiled)
    if not isinstance(plan, Plan):
        raise InvalidArgumentError(f"attach takes a sparsec Plan or CompiledModel, not {type(plan_or_compiled).__name__}")
    if decode not in DECODE_MODES:
        raise InvalidArgumentError(f"decode must be one of {DECODE_MODES}, not {decode!r}")
    if decode_max_queries < 1:
        raise InvalidArgumentError(f"decode_max_queries must be at least 1, not {decode_max_queries}")
    config = getattr(model, "config", None)
    if not hasattr(model, "set_attn_implementation") or config is None:
        raise InvalidArgumentError("attach needs a Hugging Face PreTrainedModel (one that dispatches attention "
                                   "through transformers' AttentionInterface)")
    previous = config._attn_implementation
    if previous.startswith("sparsec_"):
        raise InvalidArgumentError("this model already has a sparsec plan attached; detach() it first")
    if previous not in WRAPPABLE:
        raise InvalidArgumentError(
            f"the model runs attention implementation {previous!r}; attach wraps {WRAPPABLE} (whose masks the "
            "sparse path reads): model.set_attn_implementation('sdpa') first")
    runners = {}
    modules = _modules_by_site(model, plan)
    for site in plan.attention:
        groups = model_order_groups(site)
        runners[modules[site.name]] = _SiteRunner(
            site=site.name, num_heads=site.num_heads, causal=site.effective_causal(),
            prefill_groups=encode_groups(groups),
            decode_groups=encode_groups(_decode_groups(groups)) if decode == "sparse" else None,
            decode_max_queries=decode_max_queries)
    name = _register(previous)
    model.set_attn_implementation(name)
    _RUNNERS.update(runners)
    return Attachment(model, previous, name, runners)
