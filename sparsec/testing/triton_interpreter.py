"""A worker process running Triton's CPU interpreter, for tests of the generated kernels
on machines without a GPU."""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import tempfile
from multiprocessing.pool import Pool
from pathlib import Path
from typing import Iterator

_SETTINGS = ("TRITON_INTERPRET", "SPARSEC_CACHE_DIR")


@contextlib.contextmanager
def interpreter_worker() -> Iterator[tuple[Pool, Path]]:
    """``(pool, cache)``: a one-process pool under ``TRITON_INTERPRET=1`` with a private
    kernel cache folder ``cache`` (deleted on exit); this process's environment is left as
    it was.

    ``TRITON_INTERPRET`` must be set before Triton is imported (its own library functions
    are decorated at import), so interpreted cases run in a spawned process: call
    ``pool.apply(function, args)`` with a module-level ``function``."""
    saved = {name: os.environ.get(name) for name in _SETTINGS}
    with tempfile.TemporaryDirectory() as cache:
        os.environ.update(TRITON_INTERPRET="1", SPARSEC_CACHE_DIR=cache)
        try:
            pool = multiprocessing.get_context("spawn").Pool(1)
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name)
                else:
                    os.environ[name] = value
        with pool:
            yield pool, Path(cache)
