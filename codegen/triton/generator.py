"""Generate one readable Triton source file per sparse-attention kernel.

A :class:`KernelSpec` names everything a kernel is specialised for: the pattern family
and its parameters, head dim, dtype, causal, the config (block sizes, warps, stages) and
the architecture. :func:`generate` picks the family's template (index arithmetic or
lookup table), copies the shared device code and the template's functions into one file,
and bakes the compile-time constants and pattern parameters in, under a header that says
what the file computes and for which plan entry. The file name spells out the parameters
plus a content hash (as flashinfer's JIT URIs); :func:`write_if_different` writes it
under a file lock, only when the bytes change.
"""
from __future__ import annotations

import fcntl
import hashlib
import inspect
import json
import os
import re
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sparsec.patterns import Elastic, get_pattern
from sparsec.ir.plan import AttentionSite
from sparsec.ir.targets import Target, get_target

from sparsec.codegen.triton import flash_common, flash_index, flash_lut
from sparsec.codegen.triton.configs import KernelConfig, candidate_configs

GENERATOR_VERSION = 3

_TEMPLATES = {
    "index": (flash_index, "index arithmetic: key-block ranges computed from the program id, no lookup table"),
    "lut": (flash_lut, "lookup table: per-query-block key-block list (full blocks first), plus gathered columns"),
}
_DTYPES = {"float16": "f16", "bfloat16": "bf16", "float32": "f32"}


def padded_head_dim(head_dim: int) -> int:
    """The power of two (at least 16, tl.dot's minimum) a head dim is padded to in-kernel."""
    return max(16, 1 << (head_dim - 1).bit_length())


def has_kernel(pattern: str) -> bool:
    """Whether a generated Triton kernel serves ``pattern`` (the family names a template)."""
    return get_pattern(pattern).triton_template is not None


def _slug(pattern: str, key: str, value) -> str:
    """A short file-name rendering of one parameter: sizes as ``a`` or ``a+bN``, lists as
    their values (or their length when they hold lists, e.g. block_topk's ``blocks``)."""
    if key in get_pattern(pattern).elastic_params:
        return str(Elastic.from_json(value))
    if isinstance(value, list):
        if any(isinstance(item, list) for item in value) or len(value) > 8:
            return f"{len(value)}"
        return "x".join(str(item) for item in value)
    return str(value)


@dataclass(frozen=True)
class KernelSpec:
    """What one generated kernel is specialised for."""

    pattern: str
    params: str            # canonical JSON of the pattern parameters (sorted keys)
    head_dim: int
    dtype: str             # "float16", "bfloat16" or "float32"
    causal: bool
    config: KernelConfig
    arch: str              # "sm80", "sm90", ... or "cpu" (the Triton interpreter)

    @staticmethod
    def make(pattern: str, params: dict, head_dim: int, dtype: str, causal: bool,
             config: KernelConfig, arch: str) -> "KernelSpec":
        if not has_kernel(pattern):
            raise ValueError(f"no generated kernel for pattern {pattern!r}: dense runs "
                             "scaled_dot_product_attention and skip writes zeros")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype {dtype!r}; generated kernels take {list(_DTYPES)}")
        return KernelSpec(pattern, json.dumps(params, sort_keys=True), head_dim, dtype, causal, config, arch)

    @property
    def template(self) -> str:
        return get_pattern(self.pattern).triton_template

    @property
    def constexprs(self) -> dict:
        """The template's compile-time constants, except ``MASK_KIND`` (chosen per call)."""
        family = get_pattern(self.pattern).triton_flags
        return {"HEAD_DIM": self.head_dim, "D_PAD": padded_head_dim(self.head_dim),
                "BLOCK_M": self.config.block_m, "BLOCK_N": self.config.block_n,
                "CAUSAL": self.causal, **family, "FP32_DOT": self.dtype == "float32", "TMA": self.config.tma}

    @property
    def stem(self) -> str:
        """File-name stem spelling out the parameters."""
        slug = "_".join(f"{key}{_slug(self.pattern, key, value)}" for key, value in json.loads(self.params).items())
        slug = re.sub(r"[^A-Za-z0-9.+_-]+", "-", slug)[:60]
        return (f"{self.pattern}_{slug}_d{self.head_dim}_{_DTYPES[self.dtype]}_"
                f"{'causal' if self.causal else 'full'}_{self.config.tag}_{self.arch}")


@dataclass(frozen=True)
class GeneratedKernel:
    spec: KernelSpec
    source: str
    filename: str          # "<stem>_<content hash>.py"


_HEADER = '''"""sparsec generated kernel: {pattern} sparse attention (forward), {description}.

Computes, for the query heads h of one head group in one launch,
    out[b, h] = softmax(scale * q[b, h] @ k[b, h // per_kv]^T + mask) @ v[b, h // per_kv]
restricted to the {pattern} pattern ({causal_text}); sizes are elastic in N = n_k and are
resolved at launch. A query row with no kept key is 0.
Pattern parameters: {params}
Plan entry: {plan_entry}
Template: {template_name} ({template_summary}).
Specialised for: head_dim {head_dim} (padded to {d_pad}), {dtype} inputs, fp32 accumulation,
{config}, arch {arch}.
Generated by sparsec {version}, generator v{generator_version}. Do not edit: the runtime
rewrites this file whenever the generator's output differs.
"""
import triton
import triton.language as tl

SPEC = {spec}
CONSTEXPRS = {constexprs}
LAUNCH = {launch}
'''


def _function_sources(functions) -> str:
    # Each template function's own source (decorator included), without the module around it.
    return "\n\n".join(inspect.getsource(getattr(f, "fn", f)).rstrip() for f in functions)


def generate(spec: KernelSpec, plan_entry: str = "") -> GeneratedKernel:
    """The kernel source for ``spec``; ``plan_entry`` names the plan site and heads it serves."""
    from sparsec.ir.version import __version__

    module, summary = _TEMPLATES[spec.template]
    params = json.loads(spec.params)
    config = spec.config
    header = _HEADER.format(
        pattern=spec.pattern, description=get_pattern(spec.pattern).describe(params) or "no parameters",
        causal_text="causal" if spec.causal else "not causal", params=spec.params,
        plan_entry=plan_entry or "none (generated at run time for a group table)",
        template_name=f"{spec.template} ({Path(module.__file__).name})", template_summary=summary,
        head_dim=spec.head_dim, d_pad=padded_head_dim(spec.head_dim), dtype=spec.dtype,
        config=(f"BLOCK_M={config.block_m} BLOCK_N={config.block_n} num_warps={config.num_warps} "
                f"num_stages={config.num_stages}{' TMA' if config.tma else ''}"),
        arch=spec.arch, version=__version__, generator_version=GENERATOR_VERSION,
        spec=repr({"pattern": spec.pattern, "params": params, "head_dim": spec.head_dim,
                   "dtype": spec.dtype, "causal": spec.causal, "arch": spec.arch}),
        constexprs=repr(spec.constexprs),
        launch=repr({"num_warps": config.num_warps, "num_stages": config.num_stages}))
    body = ("\n\n# ---- shared device code (codegen/triton/flash_common.py) ----\n\n"
            + _function_sources((flash_common._attend_tile, flash_common._attend_columns, flash_common._load_key_rows,
                                 flash_common._program_bases, flash_common._load_query_tile,
                                 flash_common._store_output))
            + f"\n\n# ---- {spec.template} template ({Path(module.__file__).name}) ----\n\n"
            + _function_sources(module.TEMPLATE_FUNCTIONS) + "\n")
    source = header + body
    digest = hashlib.sha256(source.encode()).hexdigest()[:12]
    return GeneratedKernel(spec, source, f"{spec.stem}_{digest}.py")


@contextmanager
def file_lock(directory: Path):
    """An exclusive lock on ``directory/.lock``, serialising writers across processes."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def write_atomic(path: Path, text: str) -> None:
    """Write through a temporary file and a rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _holds(path: Path, text: str) -> bool:
    try:
        return path.is_file() and path.read_text() == text
    except (OSError, UnicodeDecodeError):
        return False


def write_if_different(path: "str | Path", text: str) -> bool:
    """Write ``text`` to ``path`` unless it already holds exactly that; True when written.

    The check reads without a lock (files are replaced by rename, so a reader sees a whole
    file), so a read-only cache that already holds the kernel works; only a write takes the
    directory's lock (and raises ``OSError`` where the directory is not writable)."""
    path = Path(path)
    if _holds(path, text):
        return False
    with file_lock(path.parent):
        if _holds(path, text):
            return False
        write_atomic(path, text)
        return True


def site_kernels(site: AttentionSite, target: "str | Target", dtype: str = "bfloat16") -> list[GeneratedKernel]:
    """The kernels of one attention site's sparse groups for ``target``, at its default config.

    Needs no GPU: compiling for ``a100`` on a laptop still produces every source.
    """
    target = get_target(target)
    kernels = []
    for group in site.groups:
        if not has_kernel(group.pattern):
            continue
        config = candidate_configs(target.arch, dtype, padded_head_dim(site.head_dim), target)[0]
        spec = KernelSpec.make(group.pattern, group.params, site.head_dim, dtype, site.causal, config,
                               target.arch)
        entry = f"site {site.name} (layer {site.layer}), heads {group.heads}"
        kernels.append(generate(spec, plan_entry=entry))
    return kernels


def write_kernels(kernels: list[GeneratedKernel], directory: "str | Path") -> list[Path]:
    """Write kernels into ``directory`` (e.g. an artifact's ``kernels/``), each only if different."""
    paths = []
    for kernel in kernels:
        path = Path(directory) / kernel.filename
        write_if_different(path, kernel.source)
        paths.append(path)
    return paths
