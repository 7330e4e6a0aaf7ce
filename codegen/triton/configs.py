"""Kernel configs (block sizes, warps, pipeline stages) per target architecture.

Each architecture lists a few candidates, the default first; the runtime times them on
first use per shape bucket (a bounded autotune) and caches the choice on disk. A target
profile can replace the list through ``Target.kernel_configs["attention"]`` (a list of
``{"block_m", "block_n", "num_warps", "num_stages"}``; at run time, the target a compiled
model runs for, :func:`sparsec.ir.targets.running_for`), and ``SPARSEC_ATTENTION_CONFIGS``
(config tags) replaces both, to sweep configs on a new GPU with ``sparsec bench attention``.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from sparsec.ir import config

from sparsec.ir.targets import Target


@dataclass(frozen=True)
class KernelConfig:
    block_m: int          # query rows per program
    block_n: int          # keys per inner step
    num_warps: int
    num_stages: int       # software-pipelining depth of the key loop
    tma: bool = False     # K/V key blocks through tensor descriptors (Hopper's bulk copy engine)

    @property
    def tag(self) -> str:
        return f"m{self.block_m}n{self.block_n}w{self.num_warps}s{self.num_stages}" + ("tma" if self.tma else "")

    @staticmethod
    def from_tag(tag: str) -> "KernelConfig":
        """The config a :attr:`tag` names, e.g. ``m128n64w8s3`` or ``m64n64w4s3tma``."""
        match = re.fullmatch(r"m(\d+)n(\d+)w(\d+)s(\d+)(tma)?", tag)
        if not match:
            raise ValueError(f"kernel config {tag!r}: expected m<block_m>n<block_n>w<warps>s<stages>[tma], "
                             "e.g. m128n64w8s3 or m64n64w4s3tma")
        return KernelConfig(*(int(group) for group in match.groups()[:4]), tma=bool(match.group(5)))

    def to_dict(self) -> dict:
        return asdict(self)


# Hopper (measured on an H100, docs/benchmarks.md): 64 x 64 tiles of 4 warps with K/V
# through TMA win nearly everywhere (short bands, and block_topk now that its tiles skip
# the layout gather); long key loops (wide windows) sometimes prefer 128 x 128 tiles of
# 8 warps through TMA or plain pointer loads; vertical_slash (two gathers per masked
# element) needs 128 x 64 tiles of 8 warps. Ampere: 4 warps, as FlashAttention-2; no TMA.
_HALF = {
    "sm90": (KernelConfig(64, 64, 4, 3, True), KernelConfig(128, 128, 8, 3, True), KernelConfig(128, 64, 8, 3),
             KernelConfig(64, 64, 4, 3)),
    "sm80": (KernelConfig(128, 64, 4, 3), KernelConfig(128, 32, 4, 3), KernelConfig(64, 64, 4, 3)),
    # The Triton interpreter (CPU): small tiles keep the numpy work per program small;
    # TMA on, so the tests walk the descriptor path too (where the head dim allows it).
    "cpu": (KernelConfig(16, 16, 4, 1, True),),
}
# fp32 tiles are twice the bytes; wide head dims (padded past 128) likewise need smaller tiles.
_WIDE = {
    "sm90": (KernelConfig(64, 32, 4, 2), KernelConfig(64, 64, 4, 2)),
    "sm80": (KernelConfig(64, 32, 4, 2),),
    "cpu": (KernelConfig(16, 16, 4, 1),),
}


def arch_key(arch: str) -> str:
    """Map a concrete arch (``sm89``, ``sm90``, ``sm100``...) to a config family."""
    if arch == "cpu":
        return "cpu"
    major = int(arch[2:]) // 10
    return "sm90" if major >= 9 else "sm80"


def candidate_configs(arch: str, dtype_name: str, padded_head_dim: int,
                      target: Target | None = None) -> tuple[KernelConfig, ...]:
    """Configs worth timing for this arch, dtype and (padded) head dim; the default first.
    ``SPARSEC_ATTENTION_CONFIGS`` replaces them (tags), then a target profile's list where
    the target is of this arch family (an sm90 target's TMA configs do not run on sm80)."""
    if config.attention_configs():
        return tuple(KernelConfig.from_tag(tag) for tag in config.attention_configs())
    if (target is not None and target.kernel_configs.get("attention")
            and arch_key(target.arch) == arch_key(arch)):
        return tuple(KernelConfig(**c) for c in target.kernel_configs["attention"])
    wide = dtype_name == "float32" or padded_head_dim > 128
    return (_WIDE if wide else _HALF)[arch_key(arch)]
