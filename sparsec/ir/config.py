"""Every environment switch sparsec reads, in one place, typed.

- ``SPARSEC_DUMP=dir``      write pass dumps to ``dir`` (same as ``compile(dump_dir=...)``).
- ``SPARSEC_DEBUG=0..3``    0 silent, 1 pass names and times, 2 + per-pass stats,
                            3 + the graph after every pass that changed it.
- ``SPARSEC_DISABLE_PASSES=fuse_heads,merge_head_groups``  passes the pass manager skips
                            (by name; the dump and ``plan.extra["disabled_passes"]`` say so),
                            for bisecting a pass's effect.
- ``SPARSEC_CACHE_DIR=dir`` generated-kernel cache (default ``~/.cache/sparsec``).
- ``SPARSEC_ATTENTION_CONFIGS=m64n64w4s3tma,m128n64w8s3``  the attention kernel configs
                            the autotune times (tags as in the generated file names),
                            instead of the arch's candidates: for tuning on a new GPU.
- ``SPARSEC_SPARSE_LINEAR=auto|sparse|dense``  kernel of ``sparse_linear`` on CUDA: the
                            measured cost table decides (auto), or force the sparse kernel
                            wherever the structure has one, or cuBLAS on the dense weight.
- ``SPARSEC_ESTIMATE_GRAPHS=1|0``  replay a dynamic group's estimate as a CUDA graph
                            (runtime/estimate_graphs.py; the default), or issue its ops eagerly.
- ``SPARSEC_ORT_BLOCK=64``  block size of the onnxruntime ``SparseAttention`` kernel.
- ``SPARSEC_ORT_OP_THREADS=n``  worker threads of that kernel (default: the CPU count).
                            Each runs torch with one thread: an OpenMP team would spin
                            between ops and starve onnxruntime's own thread pool.
- ``TRITON_INTERPRET=1``    (Triton's own) run Triton kernels on the CPU interpreter.
"""
from __future__ import annotations

import os
from pathlib import Path


def _int(name: str, default: int, hint: str) -> int:
    raw = os.environ.get(name, "")
    try:
        return int(raw) if raw else default
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer; {hint}") from None


def dump_dir() -> Path | None:
    raw = os.environ.get("SPARSEC_DUMP", "")
    return Path(raw) if raw else None


def debug_level() -> int:
    return _int("SPARSEC_DEBUG", 0, "set it to 0, 1, 2 or 3")


def disabled_passes() -> frozenset[str]:
    raw = os.environ.get("SPARSEC_DISABLE_PASSES", "")
    return frozenset(name.strip() for name in raw.split(",") if name.strip())


def cache_dir() -> Path:
    raw = os.environ.get("SPARSEC_CACHE_DIR", "")
    return Path(raw) if raw else Path.home() / ".cache" / "sparsec"


def attention_configs() -> list[str]:
    raw = os.environ.get("SPARSEC_ATTENTION_CONFIGS", "")
    return [tag.strip() for tag in raw.split(",") if tag.strip()]


def fa4_backend() -> bool:
    """Whether the FlashAttention-4 backend (``sparsec[gpu]``, sm90+) serves the groups it
    supports where it is installed: on unless ``SPARSEC_FA4=0`` (then every sparse group runs
    sparsec's Triton kernels, and the cost model prices them so)."""
    raw = os.environ.get("SPARSEC_FA4", "1") or "1"
    if raw not in ("0", "1"):
        raise ValueError(f"SPARSEC_FA4={raw!r}; set it to 1 (FlashAttention-4 where installed, the default) "
                         "or 0 (Triton only)")
    return raw == "1"


def estimate_graphs() -> bool:
    raw = os.environ.get("SPARSEC_ESTIMATE_GRAPHS", "1") or "1"
    if raw not in ("0", "1"):
        raise ValueError(f"SPARSEC_ESTIMATE_GRAPHS={raw!r}; set it to 1 (CUDA graphs, the default) or 0 (eager)")
    return raw == "1"


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def ort_rows() -> int:
    rows = _int("SPARSEC_ORT_ROWS", 128, "set it to a number of query rows per chunk, e.g. 128")
    if rows < 1:
        raise ValueError(f"SPARSEC_ORT_ROWS={rows} must be a positive number of query rows, e.g. 128")
    return rows


def ort_op_threads() -> int:
    threads = _int("SPARSEC_ORT_OP_THREADS", os.cpu_count() or 1, "set it to a thread count, e.g. 4")
    if threads < 1:
        raise ValueError(f"SPARSEC_ORT_OP_THREADS={threads}; set it to a positive thread count")
    return threads


def sparse_linear_kernel() -> str:
    raw = os.environ.get("SPARSEC_SPARSE_LINEAR", "auto") or "auto"
    if raw not in ("auto", "sparse", "dense"):
        raise ValueError(f"SPARSEC_SPARSE_LINEAR={raw!r}; set it to auto, sparse or dense")
    return raw
