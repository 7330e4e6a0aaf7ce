"""Generated Triton attention kernels at run time, and the CUDA kernel of
``torch.ops.sparsec.sparse_attention``.

- Cache: a kernel's source is generated from its :class:`KernelSpec`, written (only if
  different, under a file lock) to ``cache_dir()/attention-v<generator>/<arch>/`` and
  imported once per process.
- Configs: the arch's candidates (:mod:`sparsec.codegen.triton.configs`), or the running
  target's (:func:`sparsec.ir.targets.running_for`), are timed at first use per shape bucket,
  a bounded autotune; the choice is kept in ``autotune.json`` beside the kernels, keyed
  also by the candidates' kernel hashes, so later processes reuse it until a kernel changes.
- Launch: one launch per head group. The group's query heads are gathered in-kernel
  through a head-index array, so q/k/v are never copied and GQA never repeats K/V.
  ``dense`` groups run ``F.scaled_dot_product_attention`` (FlashAttention on a GPU),
  ``skip`` groups are zero. Everything but the tensors is prepared once per input
  signature (group table, shapes, strides, dtypes, mask layout), so a repeated call
  pays only the launches.

CUDA tensors reach :func:`sparse_attention` through the op; CPU tensors keep the reference
kernel. Under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors (the tests).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Callable

import torch
import triton
import triton.testing
from triton.tools.tensor_descriptor import TensorDescriptor

from sparsec.ir import config
from sparsec.codegen.triton import block_mass  # noqa: F401  (registers the fused dynamic estimates)
from sparsec.codegen.triton.configs import KernelConfig, candidate_configs
from sparsec.codegen.triton.generator import (GENERATOR_VERSION, KernelSpec, file_lock, generate, has_kernel,
                                              padded_head_dim, write_atomic, write_if_different)
from sparsec.patterns import get_pattern
from sparsec.patterns.base import backend_piece, mask_4d, mask_rows
from sparsec.ir.plan import HeadGroup, decoded_groups, encode_groups
from sparsec.runtime import estimate_graphs, fa4, sparse_tables
from sparsec.ir import reference
from sparsec.ir.targets import running_target

_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
_LOG2E = 1.4426950408889634
_MAX_HEAD_DIM = 256


def device_arch(device: torch.device) -> str:
    """``sm<major><minor>`` of a CUDA device; ``cpu`` (the Triton interpreter) otherwise."""
    if device.type != "cuda":
        return "cpu"
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


def kernel_dir(arch: str):
    """Where this sparsec's generated kernels for ``arch`` live (versioned, arch-keyed)."""
    return config.cache_dir() / f"attention-v{GENERATOR_VERSION}" / arch


_generate = lru_cache(maxsize=512)(generate)
_MODULES: dict[tuple[str, bool], ModuleType] = {}
_UNWRITABLE: set[str] = set()          # cache directories already warned about (one warning each)
_PRIVATE_DIR: list[Path] = []          # this process's uncached kernel files, when the cache is read-only


def _warn_uncached(directory: Path, error: OSError) -> None:
    if str(directory) not in _UNWRITABLE:
        _UNWRITABLE.add(str(directory))
        warnings.warn(f"sparsec: the kernel cache {directory} is not writable ({error}); kernels and "
                      "autotune choices of this process are not cached there (set SPARSEC_CACHE_DIR to a "
                      "writable directory to keep them)", stacklevel=4)


def _private_kernel_path(filename: str, source: str) -> Path:
    """``filename`` written into a private temporary directory of this process (not a cache)."""
    if not _PRIVATE_DIR:
        _PRIVATE_DIR.append(Path(tempfile.mkdtemp(prefix="sparsec-kernels-")))
    path = _PRIVATE_DIR[0] / filename
    if not path.is_file():
        write_atomic(path, source)
    return path


def _kernel_file(path: Path, source: str) -> Path:
    """The file to import ``source`` from: the cache entry (read without a lock when it already
    holds these bytes, written under the lock otherwise), or a private file when the cache
    cannot be written."""
    try:
        write_if_different(path, source)
        return path
    except OSError as error:
        _warn_uncached(path.parent, error)
        return _private_kernel_path(path.name, source)


def load_kernel(spec: KernelSpec) -> ModuleType:
    """The imported module of ``spec``'s generated kernel (written to the cache if needed)."""
    kernel = _generate(spec)
    path = kernel_dir(spec.arch) / kernel.filename
    key = (str(path), config.triton_interpret())
    module = _MODULES.get(key)
    if module is None:
        path = _kernel_file(path, kernel.source)
        module_spec = importlib.util.spec_from_file_location(f"sparsec_kernel_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        _MODULES[key] = module
    return module


# -- launch arguments ---------------------------------------------------------------------

def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@lru_cache(maxsize=64)
def _dummy(device: torch.device) -> torch.Tensor:
    return torch.zeros(1, dtype=torch.int8, device=device)


@lru_cache(maxsize=1024)
def _head_index(heads: tuple[int, ...], device: torch.device, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """The heads as a device tensor, made once: a tensor built from a list per call is a
    host-to-device copy that waits for the GPU (measured: every call of a site with a dense
    group stalled the host until the queue drained)."""
    return torch.tensor(heads, dtype=dtype, device=device)


def _user_mask(mask: torch.Tensor | None, shape: tuple, device: torch.device):
    """(tensor, kind, 4 strides) of the 4-D mask broadcast to ``[B, Hq, n_q, n_k]`` without a copy."""
    if mask is None:
        return _dummy(device), 0, (0, 0, 0, 0)
    mask = mask.expand(shape)
    if mask.dtype == torch.bool:
        return mask.view(torch.uint8), 1, mask.stride()
    return mask, 2, mask.stride()


def _kv_descriptors(k: torch.Tensor, v: torch.Tensor, block_n: int):
    """K and V as ``[B * Hkv * n_k, D]`` tensor descriptors of ``block_n``-row tiles, or None
    when their layout does not allow it (a padded head dim, non-contiguous heads, misaligned)."""
    head_dim = k.shape[-1]
    if (head_dim != padded_head_dim(head_dim) or not (k.is_contiguous() and v.is_contiguous())
            or k.data_ptr() % 16 or v.data_ptr() % 16):
        return None
    return tuple(TensorDescriptor(t, [t.numel() // head_dim, head_dim], [head_dim, 1], [block_n, head_dim])
                 for t in (k, v))


def _lead_strides(table: torch.Tensor, leading: int, trailing: int) -> tuple[int, ...]:
    """Strides of a table's (batch, slot, query block) dims; dims it lacks are shared (0)."""
    own = table.stride()[: table.dim() - trailing] if table.numel() > 1 else ()
    return (0,) * (leading - len(own)) + tuple(own)


def estimate_dynamic(q: torch.Tensor, k: torch.Tensor, group: HeadGroup, scale: float,
                     causal: bool, mask: torch.Tensor | None = None, heads: torch.Tensor | None = None) -> tuple:
    """A dynamic group's estimate (``vertical_slash``: columns and diagonals; ``dynamic_blocks``:
    its layout and block): the reference's own estimate
    (``estimate_indices`` of the family, same ops on the same values, the site's user mask
    included). Only the estimating queries are read, so only they (and their mask rows) are
    gathered. A family's ``"triton_estimate"`` piece (one kernel reading q and k in place)
    serves a site without a user mask where it can (it returns None where not). ``heads``: the
    group's heads as a long device tensor, made here when not given."""
    family = get_pattern(group.pattern)
    if heads is None:
        heads = _head_index(tuple(group.heads), q.device, torch.long)
    rows = family.estimating_rows(group.params, q.shape[2], q.device)
    fused = backend_piece("triton_estimate", group.pattern)
    if fused is not None and mask is None and (q.is_cuda or config.triton_interpret()):
        estimate = fused(group.params, q, k, heads, rows, scale, causal)
        if estimate is not None:
            return estimate
    q_rows = q.index_select(2, rows).index_select(1, heads)
    k_group = k.index_select(1, heads // (q.shape[1] // k.shape[1]))
    if mask is not None:
        mask = _mask_heads(mask_rows(mask, rows), heads)
    return family.estimate_from_rows(group.params, q_rows, rows, q.shape[2], k_group, scale, causal, mask)


class _Group:
    """One head group's kernel launch for one input signature (shapes, strides, dtype, mask
    layout), prepared per kernel config; the tensors themselves are passed per call."""

    def __init__(self, q, k, v, mask, scale: float, causal: bool, group: HeadGroup):
        self.q, self.k, self.v, self.mask = q, k, v, mask      # this signature's example tensors
        self.scale, self.causal, self.group = scale, causal, group
        self.heads = _head_index(tuple(group.heads), q.device)
        self.params = json.dumps(group.params, sort_keys=True)
        self.arch = device_arch(q.device)
        self.mask_kind = _user_mask(mask, self.mask_shape, q.device)[1]

    @property
    def mask_shape(self) -> tuple:
        return (self.q.shape[0], self.q.shape[1], self.q.shape[2], self.k.shape[2])

    def spec(self, kernel_config: KernelConfig) -> KernelSpec:
        return KernelSpec.make(self.group.pattern, self.group.params, self.q.shape[-1],
                               _DTYPE_NAMES[self.q.dtype], self.causal, kernel_config, self.arch)

    def autotune_key(self, candidates: tuple[KernelConfig, ...]) -> str:
        """The autotune key: everything but the config, lengths and head count by power of 2,
        and a hash of the candidates' generated kernels (their file names end in a content
        hash), so a changed template or candidate list never reuses a choice timed for other
        kernels, whether or not ``GENERATOR_VERSION`` was bumped."""
        q, k = self.q, self.k
        names = "|".join(_generate(self.spec(candidate)).filename for candidate in candidates)
        return (f"{self.arch}|{self.group.pattern}|{self.params}|d{q.shape[-1]}|{_DTYPE_NAMES[q.dtype]}|"
                f"causal{int(self.causal)}|mask{self.mask_kind}|q{_pow2(q.shape[2])}|k{_pow2(k.shape[2])}|"
                f"bh{_pow2(q.shape[0] * len(self.group.heads))}|"
                f"kernels{hashlib.sha256(names.encode()).hexdigest()[:12]}")

    def prepare(self, kernel_config: KernelConfig) -> Callable[..., None]:
        """``launch(q, k, v, out, mask)``: the group's kernel at ``kernel_config``. Everything
        but the tensors (module, grid, strides, sizes, static tables) is resolved here once."""
        spec = self.spec(kernel_config)
        module = load_kernel(spec)
        q, k, v = self.q, self.k, self.v
        batch, num_heads, n_q, _ = q.shape
        n_k = k.shape[2]
        mask_strides = _user_mask(self.mask, self.mask_shape, q.device)[2]
        common = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *_out_strides(q, v), *mask_strides)
        sizes = (len(self.group.heads), num_heads // k.shape[1], n_q, n_k, self.scale * _LOG2E)
        grid = (batch * len(self.group.heads), triton.cdiv(n_q, kernel_config.block_m))
        meta = {key: value for key, value in module.CONSTEXPRS.items() if key != "TMA"}
        meta.update(MASK_KIND=self.mask_kind, **module.LAUNCH)
        if config.triton_interpret() and q.dtype == torch.bfloat16:
            meta["FP32_DOT"] = True       # the CPU interpreter's tl.dot misreads bf16 operands (Triton 3.9)
        kernel = module._sparse_attention_fwd
        heads, group, causal, scale = self.heads, self.group, self.causal, self.scale
        dynamic = get_pattern(group.pattern).dynamic
        bm, bn = kernel_config.block_m, kernel_config.block_n

        def tables_args(tables: sparse_tables.LutTables) -> tuple:
            return (tables.lut, tables.counts, tables.columns, tables.layout, tables.colmap, tables.offmap)

        def tables_strides(tables: sparse_tables.LutTables) -> tuple:
            return (*_lead_strides(tables.lut, 3, 1), *_lead_strides(tables.counts, 3, 1),
                    *_lead_strides(tables.columns, 3, 1), *_lead_strides(tables.colmap, 2, 1),
                    *_lead_strides(tables.offmap, 2, 1), *_lead_strides(tables.layout, 2, 2))

        if spec.template == "index":
            index = sparse_tables.index_arguments(spec.params, n_q, n_k, q.device)
            before, after = (index.colmap, index.columns), (*common, *sizes, *index.scalars())
        elif dynamic:
            meta["UNIFORM_TILES"] = False
            # Estimated per input, replayed as a CUDA graph where it can be (its heads are held
            # here, so no cache eviction frees what the graph reads).
            estimate_heads = _head_index(tuple(group.heads), q.device, torch.long)
            dynamic_tables = estimate_graphs.EstimateGraph(
                lambda q, k, mask: backend_piece("triton_tables", group.pattern)(
                    *estimate_dynamic(q, k, group, scale, causal, mask, estimate_heads), n_q, n_k, causal, bm, bn))
        else:
            tables = sparse_tables.grid_tables(spec.pattern, spec.params, n_q, n_k, causal, bm, bn, q.device)
            before = tables_args(tables)
            after = (*common, *tables_strides(tables), *sizes, *tables.layout_shape)
            # Tiles inside one cell of the kept-cell grid each are kept whole (see _lut_keep).
            block = tables.layout_shape[0]
            meta["UNIFORM_TILES"] = block % bm == 0 and block % bn == 0 and (n_k - n_q) % block == 0

        def launch(q, k, v, out, mask) -> None:
            nonlocal before, after
            if dynamic:                                     # estimated per input
                tables = dynamic_tables(q, k, mask)
                before = tables_args(tables)
                after = (*common, *tables_strides(tables), *sizes, *tables.layout_shape)
            descriptors = _kv_descriptors(k, v, bn) if kernel_config.tma else None
            user_mask = _user_mask(mask, (batch, num_heads, n_q, n_k), q.device)[0]
            kernel[grid](q, k, v, out, heads, user_mask, *before, *(descriptors or (k, v)), *after,
                         **meta, TMA=descriptors is not None)
        return launch


def _out_strides(q: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int]:
    """Strides (batch, head, row) of the contiguous ``[B, Hq, n_q, Dv]`` output."""
    batch, heads, rows = q.shape[:3]
    return (heads * rows * v.shape[-1], rows * v.shape[-1], v.shape[-1])


# -- bounded autotune -----------------------------------------------------------------------

_TUNED: dict[str, KernelConfig] = {}
tuning_log: list[dict] = []        # every autotune of this process: bucket, chosen config, timings


def _choose_config(group: _Group, autotune: bool) -> KernelConfig:
    """The group's config: the default of the arch (or of the running target, see
    :func:`sparsec.ir.targets.running_for`), or the fastest candidate for its shape bucket."""
    q = group.q
    candidates = candidate_configs(group.arch, _DTYPE_NAMES[q.dtype], padded_head_dim(q.shape[-1]),
                                   running_target())
    if len(candidates) == 1 or not autotune:
        return candidates[0]
    key = group.autotune_key(candidates)
    if key in _TUNED:
        return _TUNED[key]
    directory = kernel_dir(group.arch)
    path = directory / "autotune.json"
    stored = _stored_choice(_read_autotune(path), key, candidates)
    if stored is None:
        timings = {}
        for candidate in candidates:
            try:
                launch = group.prepare(candidate)
                out = torch.empty(q.shape[:-1] + (group.v.shape[-1],), dtype=q.dtype, device=q.device)
                timings[candidate] = triton.testing.do_bench(
                    lambda: launch(q, group.k, group.v, out, group.mask), warmup=5, rep=20, return_mode="median")
            except (triton.runtime.errors.OutOfResources, triton.compiler.errors.CompilationError):
                continue                               # e.g. too much shared memory on this chip
        stored = {"config": min(timings, key=timings.get).to_dict(),
                  "timings_ms": {c.tag: round(ms, 4) for c, ms in timings.items()}}
        tuning_log.append({"bucket": key, **stored})
        _store_choice(directory, path, key, stored)
    _TUNED[key] = KernelConfig(**stored["config"])
    return _TUNED[key]


def _read_autotune(path: Path, warn: bool = True) -> dict:
    """The autotune table at ``path``: {} when absent, and {} with a warning naming the file
    when it is unreadable or not a JSON object (it is rebuilt on the next choice stored)."""
    try:
        table = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        table, reason = None, f"{type(error).__name__}: {error}"
    else:
        reason = f"a JSON {type(table).__name__}, not an object"
    if isinstance(table, dict):
        return table
    if warn:
        warnings.warn(f"sparsec: the autotune cache {path} is corrupt ({reason}); it is ignored and "
                      "rebuilt", stacklevel=4)
    return {}


def _stored_choice(table: dict, key: str, candidates: list[KernelConfig]) -> dict | None:
    """The stored choice of ``key`` when it is well formed and still a candidate."""
    stored = table.get(key)
    try:
        if isinstance(stored, dict) and KernelConfig(**stored["config"]) in candidates:
            return stored
    except (TypeError, KeyError, ValueError):
        pass
    return None


def _store_choice(directory: Path, path: Path, key: str, stored: dict) -> None:
    """Add one choice to ``autotune.json`` under the cache lock; skipped (one warning) when
    the cache cannot be written."""
    try:
        with file_lock(directory):
            table = _read_autotune(path, warn=False)
            table[key] = stored
            write_atomic(path, json.dumps(table, indent=1, sort_keys=True))
    except OSError as error:
        _warn_uncached(directory, error)


def chosen_config(q, k, v, mask, scale: float, causal: bool, group: HeadGroup) -> KernelConfig:
    """The config a group runs at for these inputs (tuning it now if it was not yet)."""
    return _choose_config(_Group(q, k, v, mask, scale, causal, group), autotune=True)


# -- groups ---------------------------------------------------------------------------------

def _mask_heads(mask: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor | None:
    """A 4-D mask's (:func:`mask_4d`) rows of the query heads ``index``."""
    if mask is None or mask.shape[1] == 1:
        return mask
    return mask.index_select(1, index.to(mask.device))


def _dense_group(q, k, v, out, mask, scale, causal, heads: list[int]) -> None:
    """``dense`` heads: SDPA on a head slice where the slice is whole KV groups, else gathered.
    ``mask`` is 4-D (:func:`mask_4d`)."""
    per_kv = q.shape[1] // k.shape[1]
    first, end = heads[0], heads[-1] + 1
    if heads == list(range(first, end)) and first % per_kv == 0 and end % per_kv == 0:
        sliced_mask = mask if mask is None or mask.shape[1] == 1 else mask[:, first:end]
        out[:, first:end] = reference.dense_attention(
            q[:, first:end], k[:, first // per_kv:end // per_kv], v[:, first // per_kv:end // per_kv],
            sliced_mask, scale, causal)
        return
    index = _head_index(tuple(heads), q.device, torch.long)
    kv_index = index // per_kv
    result = reference.dense_attention(q.index_select(1, index), k.index_select(1, kv_index),
                                       v.index_select(1, kv_index), _mask_heads(mask, index), scale, causal)
    out.index_copy_(1, index, result)


def _kernel_unsupported(q, k, v, group: HeadGroup) -> str:
    if not has_kernel(group.pattern):
        return f"no kernel family for pattern {group.pattern!r}"
    if k.shape[-1] != v.shape[-1] or q.shape[-1] != k.shape[-1]:
        return "q/k and v head dims differ"
    if q.shape[-1] > _MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} > {_MAX_HEAD_DIM}"
    if not (q.dtype == k.dtype == v.dtype):
        return "q, k and v dtypes differ"
    if q.shape[-2] > k.shape[-2] and not get_pattern(group.pattern).triton_more_queries_than_keys:
        return f"{group.pattern} with more queries than keys"
    return ""


_WARNED: set[str] = set()


def _reference_group(q, k, v, out, mask, scale, causal, group: HeadGroup, reason: str) -> None:
    if reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(f"sparsec: {reason}; those heads run the reference kernel", stacklevel=3)
    index = _head_index(tuple(group.heads), q.device, torch.long)
    result = reference.sparse_attention(q, k, v, mask, scale, causal, [group])
    out.index_copy_(1, index, result.index_select(1, index))


def _group_launch(q, k, v, mask, scale: float, causal: bool, group: HeadGroup, autotune: bool):
    """``launch(q, k, v, out, mask)`` of one group for this input signature."""
    family = get_pattern(group.pattern)
    if family.computes_none:
        index = _head_index(tuple(group.heads), q.device, torch.long)
        return lambda q, k, v, out, mask: out.index_fill_(1, index, 0)
    if family.computes_all:
        return lambda q, k, v, out, mask: _dense_group(q, k, v, out, mask, scale, causal, group.heads)
    if reason := _kernel_unsupported(q, k, v, group):
        return lambda q, k, v, out, mask: _reference_group(q, k, v, out, mask, scale, causal, group, reason)
    prepared = _Group(q, k, v, mask, scale, causal, group)
    return prepared.prepare(_choose_config(prepared, autotune))


_CALL_PLANS: dict[tuple, list] = {}
_MAX_CALL_PLANS = 256                # signatures kept (oldest dropped): lengths vary in serving


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     scale: float, causal: bool, groups: "str | list[HeadGroup]", *,
                     out: torch.Tensor | None = None, autotune: bool = True) -> torch.Tensor:
    """``sparse_attention`` through the generated kernels, one launch per head group.

    Same contract as :func:`sparsec.ir.reference.sparse_attention` (``groups`` a list
    of :class:`HeadGroup` or the op's JSON group table); ``out``, when given, must be
    contiguous and is written in place (every element of the groups' heads). Groups no
    kernel serves fall back to the reference, with a warning once per reason. Each input
    signature's launches are prepared once, so a repeated call costs the launches alone.
    """
    table = groups if isinstance(groups, str) else encode_groups(groups)
    if q.device.type != "cuda" and not config.triton_interpret():
        return reference.sparse_attention(q, k, v, mask, scale, causal, decoded_groups(table))
    if out is None:
        out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype, device=q.device)
    elif not out.is_contiguous() or out.shape != q.shape[:-1] + (v.shape[-1],):
        raise ValueError(f"out must be a contiguous {tuple(q.shape[:-1]) + (v.shape[-1],)} tensor")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    mask = mask_4d(mask)             # every group below indexes the mask's heads at dim 1
    target = running_target()        # its kernel configs pick the launches' configs
    signature = (table, q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), q.dtype, k.dtype,
                 v.dtype, q.device, None if mask is None else (mask.shape, mask.stride(), mask.dtype),
                 scale, causal, autotune, config.triton_interpret(),
                 None if target is None else (target.name, target.attention_configs_key))
    launches = _CALL_PLANS.get(signature)
    if launches is None:
        # sm90+: the groups FlashAttention-4 serves run first, as one launch (runtime/fa4.py).
        launches, rest = fa4.site_launches(q, k, v, mask, scale, causal, decoded_groups(table))
        launches += [_group_launch(q, k, v, mask, scale, causal, group, autotune) for group in rest]
        if len(_CALL_PLANS) >= _MAX_CALL_PLANS:
            _CALL_PLANS.pop(next(iter(_CALL_PLANS)))
        _CALL_PLANS[signature] = launches
    for launch in launches:
        launch(q, k, v, out, mask)
    return out


def clear_call_plans() -> None:
    """Forget every prepared signature (after switching a backend on or off)."""
    _CALL_PLANS.clear()


@contextlib.contextmanager
def fa4_enabled(on: bool):
    """Run the enclosed calls with the FlashAttention-4 backend switched on or off (the
    benchmarks' per-backend columns); prepared signatures are forgotten on the way in and out."""
    before = fa4.ENABLED
    fa4.ENABLED = on
    clear_call_plans()
    try:
        yield
    finally:
        fa4.ENABLED = before
        clear_call_plans()
