"""Hardware profiles: cost-model constants, default block sizes and kernel configs.

Compiling needs no GPU: a plan and kernel sources for ``a100`` can be produced anywhere.
A compiled model runs its calls under :func:`running_for` its target, so the run-time
kernels see the target's ``kernel_configs``.
"""
from __future__ import annotations

import functools
import json
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Target:
    name: str
    arch: str                      # "sm80", "sm90" or "cpu": keys the kernel cache
    device_type: str               # "cuda" or "cpu": where the compiled model expects to run
    peak_tflops: float             # dense bf16 matrix rate, TFLOP/s
    bandwidth_gbs: float           # device memory bandwidth, GB/s
    launch_overhead_us: float      # fixed cost of one kernel launch
    block_m: int = 64              # query block of sparse layouts and kernels
    block_n: int = 64              # key block
    kernel_configs: dict = field(default_factory=dict)   # {"attention": [KernelConfig fields, ...]}

    def to_dict(self) -> dict:
        return {"name": self.name, "arch": self.arch, "device_type": self.device_type,
                "block_m": self.block_m, "block_n": self.block_n}

    @functools.cached_property
    def attention_configs_key(self) -> str:
        """The attention kernel configs as one string, made once (run-time caches key on it)."""
        return json.dumps(self.kernel_configs.get("attention"), sort_keys=True)


_TARGETS: dict[str, Target] = {}


def register_target(target: Target) -> Target:
    _TARGETS[target.name] = target
    return target


def get_target(target: "str | Target") -> Target:
    """Look a target up by name (``cpu``, ``a100``, ``h100``, ``h200``) or pass one through."""
    if isinstance(target, Target):
        return target
    try:
        return _TARGETS[target]
    except KeyError:
        raise ValueError(
            f"unknown target {target!r}; choose one of {sorted(_TARGETS)} "
            "or register a profile with sparsec.register_target(Target(...))"
        ) from None


_RUNNING: ContextVar[Target | None] = ContextVar("sparsec_running_target", default=None)


@contextmanager
def running_for(target: "str | Target"):
    """Run the enclosed calls for ``target``: the run-time kernels take their configs from its
    ``kernel_configs`` (where its arch matches the device's) instead of the arch's defaults.
    A compiled model wraps each call in it; wrap a direct ``graph_module`` call likewise."""
    token = _RUNNING.set(get_target(target))
    try:
        yield
    finally:
        _RUNNING.reset(token)


def running_target() -> Target | None:
    """The target of the enclosing :func:`running_for`, if any."""
    return _RUNNING.get()


# Datasheet-level constants; later cost-model work replaces h100's with measured ones.
register_target(Target("cpu", "cpu", "cpu", peak_tflops=0.2, bandwidth_gbs=20.0,
                       launch_overhead_us=5.0, block_m=64, block_n=64))
register_target(Target("a100", "sm80", "cuda", peak_tflops=312.0, bandwidth_gbs=2039.0,
                       launch_overhead_us=4.0, block_m=128, block_n=64))
register_target(Target("h100", "sm90", "cuda", peak_tflops=989.0, bandwidth_gbs=3350.0,
                       launch_overhead_us=3.0, block_m=128, block_n=64))
register_target(Target("h200", "sm90", "cuda", peak_tflops=989.0, bandwidth_gbs=4800.0,
                       launch_overhead_us=3.0, block_m=128, block_n=64))
