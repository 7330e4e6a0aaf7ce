"""``shape_cache``: an LRU cache for the device tensors a function makes from shapes alone,
which a CUDA graph computes itself.

The runtime keeps such tables (rows an estimate reads, tile maps) per shape so that a call
issues no ops to make them. A CUDA graph that read a cached tensor would read it at its
address on every replay, also after the cache evicted and freed it; so while a stream is
being captured (``runtime/estimate_graphs.py``) the function runs uncached, and the graph
makes the tables on the GPU at each replay (a few small kernels, no host time).
"""
from __future__ import annotations

import functools

import torch


def shape_cache(maxsize: int):
    """``functools.lru_cache(maxsize)``, bypassed while a CUDA stream is being captured."""
    def decorate(function):
        cached = functools.lru_cache(maxsize=maxsize)(function)

        @functools.wraps(function)
        def call(*args, **kwargs):
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                return function(*args, **kwargs)
            return cached(*args, **kwargs)

        call.cache_clear = cached.cache_clear
        call.cache_info = cached.cache_info
        return call
    return decorate
