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
- **Rolling caches**: a sliding-window layer's cache keeps only the last keys, so its first
  key is not position 0. The keys it dropped (the last query's position from the
  ``position_ids`` transformers forwards, + 1 - ``n_k``) are taken off each pattern that
  reads key positions (:meth:`~sparsec.patterns.base.Pattern.without_leading_keys`, sizes
  resolved at the full length); a head no pattern of its family expresses there runs the
  site's baseline pattern, with a one-time warning.
- **Decode** runs the model's previous implementation (dense) by default; with
  ``decode="sparse"``, heads whose pattern reads a bounded number of keys
  (:meth:`~sparsec.patterns.base.Pattern.reads_bounded_keys`) keep it, the rest run dense.
- Anything the plan does not cover (sites it left unmatched, soft-capping, attention sinks,
  training-mode dropout) runs the previous implementation.
"""
from __future__ import annotations

import sys
import warnings
import weakref
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable

import torch

from sparsec.ir.errors import InvalidArgumentError, UnservableInputError
from sparsec.patterns.base import MASKED_ADDITIVE, baseline_pattern, get_pattern
from sparsec.ir.plan import AttentionSite, HeadGroup, Plan, encode_groups, group_heads

DECODE_MODES = ("dense", "sparse")
# The implementations whose masks the sparse path reads (4-D boolean / additive, or None).
WRAPPABLE = ("sdpa", "eager")
# Attention arguments sparse_attention has no equivalent for: such calls run the previous implementation.
_UNSUPPORTED_KWARGS = ("softcap", "s_aux", "sinks", "position_bias")


@dataclass(frozen=True)
class _SiteRunner:
    """One attention module's plan: its head groups for prefill and (optionally) decode."""

    site: str
    num_heads: int
    causal: bool
    prefill_groups: list[HeadGroup]
    decode_groups: list[HeadGroup] | None          # None: decode runs the previous implementation
    decode_max_queries: int
    baseline: tuple[str, dict]                     # what a head runs where its pattern cannot
    warned: set = field(default_factory=set, compare=False)    # instances already warned about

    def groups_for(self, num_queries: int) -> list[HeadGroup] | None:
        return self.prefill_groups if num_queries > self.decode_max_queries else self.decode_groups

    def group_table(self, groups: list[HeadGroup], n_q: int, n_k: int, dropped: int) -> str:
        """The op's group table for ``n_q`` queries over ``n_k`` keys, the first ``dropped``
        keys of the sequence gone from a rolling cache: each pattern as it reads over the
        keys left, sizes resolved at the full length ``n_k + dropped``."""
        if dropped == 0:
            return self._tables[groups is self.prefill_groups]
        rolled = []
        for group in groups:
            shifted = get_pattern(group.pattern).without_leading_keys(group.params, dropped, n_q, n_k + dropped)
            if shifted is None:
                self._warn_once(group)
                shifted = self.baseline        # dense or a fixed window: offsets only, nothing to shift
            rolled.append(HeadGroup(shifted[0], shifted[1], group.heads))
        return encode_groups(rolled)

    @cached_property
    def _tables(self) -> dict[bool, str | None]:
        """The unrolled group tables, encoded once: prefill (True) and decode (False)."""
        return {True: encode_groups(self.prefill_groups),
                False: None if self.decode_groups is None else encode_groups(self.decode_groups)}

    def _warn_once(self, group: HeadGroup) -> None:
        key = encode_groups([group])
        if key in self.warned:
            return
        self.warned.add(key)
        warnings.warn(
            f"sparsec.attach: {self.site} heads {group.heads} run {self.baseline[0]} instead of {group.pattern} "
            f"where the rolling sliding-window cache has dropped keys: {group.pattern} {group.params} has no "
            "parameters over the keys left", stacklevel=3)


# Attention module -> its runner, for every attached model (weak: a dropped model leaves no entry).
_RUNNERS: "weakref.WeakKeyDictionary[torch.nn.Module, _SiteRunner]" = weakref.WeakKeyDictionary()


def model_order_groups(site: AttentionSite) -> list[HeadGroup]:
    """The site's head groups in the model's own head order, one per pattern instance.

    ``fuse_heads`` permutes the compiled model's q/k/v/o weights so that groups are
    contiguous; a live Hugging Face model keeps its weights and cache unpermuted, so the
    permutation is undone here (groups by instance may be more than the compiled launches)."""
    return group_heads(site.heads_in_model_order())


def _decode_groups(groups: list[HeadGroup]) -> list[HeadGroup]:
    """Groups for ``decode="sparse"``: patterns that read a bounded number of keys kept (a
    decode step reads only part of the cache), every other head dense."""
    bounded = [get_pattern(g.pattern).reads_bounded_keys(g.params) for g in groups]
    kept = [g for g, b in zip(groups, bounded) if b]
    dense = sorted(h for g, b in zip(groups, bounded) if not b for h in g.heads)
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


def _dropped_keys(kwargs: dict, n_k: int) -> int:
    """How many keys of the sequence a rolling (sliding-window) cache no longer hands over:
    the last query's position + 1 - ``n_k``. Positions are the ``position_ids`` the
    decoder layers forward, of the least padded row (padding shifts a row's positions
    back); layers without a sliding window keep every key."""
    positions = kwargs.get("position_ids")
    if kwargs.get("sliding_window") is None or positions is None:
        return 0
    return max(0, int(positions[..., -1].max()) + 1 - n_k)


def _visible_keys(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                 causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool]:
    """``(key, value, mask, causal)`` for ``torch.ops.sparsec.sparse_attention`` from a
    Hugging Face attention call: cached + new keys ``[B, Hkv, n_k, D]`` without a static
    cache's empty slots, the model's mask (None, 4-D boolean or additive) read as its SDPA
    integration reads it, and the op's causal flag."""
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
    return key, value, mask, causal


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
        key, value, mask, causal = _visible_keys(query, key, value, attention_mask, runner.causal)
        table = runner.group_table(groups, query.shape[2], key.shape[2], _dropped_keys(kwargs, key.shape[2]))
        out = torch.ops.sparsec.sparse_attention(query, key, value, mask, scale, causal, table)
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
        plan_or_compiled: a :class:`~sparsec.ir.plan.Plan` or a :class:`~sparsec.CompiledModel`.
        decode: ``"dense"`` (decode runs the previous implementation) or ``"sparse"``
            (heads whose pattern reads a bounded number of keys, e.g. fixed ``window`` /
            ``sink_window``, keep it at decode; others dense).
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
            prefill_groups=groups, decode_groups=_decode_groups(groups) if decode == "sparse" else None,
            decode_max_queries=decode_max_queries, baseline=baseline_pattern(site))
    name = _register(previous)
    model.set_attn_implementation(name)
    _RUNNERS.update(runners)
    return Attachment(model, previous, name, runners)
