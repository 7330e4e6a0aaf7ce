"""A dynamic group's estimate and tables, replayed as one CUDA graph.

A dynamic group (``vertical_slash``, ``dynamic_blocks``) chooses its keys per input: an
estimate kernel, then some 60 small torch ops that turn its masses into a layout and the
layout into the attention kernel's tables. Issued from Python those took 1.65 ms of host
time a call on the H200's host (``bench cost-model`` series 5), where a static group takes
0.1 ms: an eager model with dynamic heads was host-bound wherever the GPU time of a site is
below that (SmolLM2 at 8k: ~0.2 ms a site), so the cost model, rightly, never chose them
there. Captured once per input signature, a call is two copies (q and k into the graph's
inputs) and one replay: 0.15 ms for dynamic_blocks and 0.25 for vertical_slash at N = 128
(eager 1.29 and 1.93; docs/benchmarks.md, session 15). ``SPARSEC_ESTIMATE_GRAPHS=0`` issues
the ops eagerly.

Graphs are used on CUDA without a user mask (its rows would be a third input to copy).
Every graph shares one memory pool: a graph's intermediates are dead once its replay ends,
and graphs replay one at a time on one stream (a model is run by one thread at a time), so
the pool holds the largest one's intermediates, and every graph's tables (which each keeps).
Inside a caller's own capture (a whole model as one graph) the ops are issued as they are. ``q`` and ``k`` are copied into
buffers shared by the graphs of their shape (their replays never overlap either), held by
those graphs alone: a signature dropped from the call plans frees its graph and, with the
last graph of a shape, the buffers. A signature whose capture fails runs eagerly from then
on, with one warning.
"""
from __future__ import annotations

import gc
import warnings
import weakref
from typing import Callable

import torch

from sparsec.ir import config

_MISSING = object()
# (role, device, dtype, shape, strides) -> the input buffer, while a graph holds it
_INPUTS: "weakref.WeakValueDictionary[tuple, torch.Tensor]" = weakref.WeakValueDictionary()
_ANCHORS: dict = {}                          # device -> the graph holding the shared pool


class EstimateGraph:
    """``tables(q, k, mask)`` of ``build`` (the group's estimate and tables), through a CUDA
    graph where ``SPARSEC_ESTIMATE_GRAPHS`` and the module docstring allow. One serves one
    prepared launch, so one input signature (shapes, strides, dtype, device): one graph."""

    def __init__(self, build: Callable):
        self.build = build
        self._graph = _MISSING          # not captured yet; None: its capture failed

    def __call__(self, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None):
        if not (q.is_cuda and mask is None and config.estimate_graphs()) or torch.cuda.is_current_stream_capturing():
            return self.build(q, k, mask)
        if self._graph is _MISSING:
            # The first call runs eagerly: kernels compiled, shape caches made before capture.
            tables = self.build(q, k, None)
            self._graph = self._capture(q, k)
            return tables
        if self._graph is None:
            return self.build(q, k, None)
        graph, q_in, k_in, tables = self._graph
        q_in.copy_(q)
        k_in.copy_(k)
        graph.replay()
        return tables

    def _capture(self, q: torch.Tensor, k: torch.Tensor):
        q_in, k_in = _input_like(q, "q"), _input_like(k, "k")
        q_in.copy_(q)
        k_in.copy_(k)
        graph = torch.cuda.CUDAGraph()
        # No garbage collection while capturing: a collected launch of an earlier signature or
        # autotune candidate would destroy its graph and free its memory, CUDA calls a capture
        # forbids; its own thread's calls alone may end it (a user's other threads run on).
        collecting = gc.isenabled()
        gc.collect()
        gc.disable()
        try:
            with torch.cuda.device(q.device), torch.cuda.graph(graph, pool=_shared_pool(q.device),
                                                               capture_error_mode="thread_local"):
                tables = self.build(q_in, k_in, None)
        except RuntimeError as error:
            warnings.warn(f"sparsec: a dynamic group's estimate could not be captured as a CUDA graph "
                          f"({type(error).__name__}: {str(error)[:200]}); it runs eagerly, at more host "
                          "time a call", stacklevel=3)
            return None
        finally:
            if collecting:
                gc.enable()
        return graph, q_in, k_in, tables


def _shared_pool(device: torch.device):
    """The memory pool every graph on ``device`` shares, held by an anchor graph that lives as
    long as the process: a pool whose graphs all died (the autotune's candidates) was released
    under the next capture into it (torch's allocator asserted its use count)."""
    if device not in _ANCHORS:
        anchor = torch.cuda.CUDAGraph()
        with torch.cuda.graph(anchor, capture_error_mode="thread_local"):
            torch.zeros(1, device=device)
        _ANCHORS[device] = anchor
    return _ANCHORS[device].pool()


def _input_like(tensor: torch.Tensor, role: str) -> torch.Tensor:
    """The graphs' input buffer for ``role`` at ``tensor``'s shape, strides and dtype."""
    key = (role, tensor.device, tensor.dtype, tuple(tensor.shape), tensor.stride())
    buffer = _INPUTS.get(key)
    if buffer is None:
        buffer = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device=tensor.device)
        _INPUTS[key] = buffer
    return buffer
