"""Measurement subcommands that can also read an earlier run instead of measuring
(``sparsec bench cost-model --refit``, ``sparsec bench linear --report``): the run comes from
a ``--json`` file or from the package data of a target (:mod:`sparsec.analysis.measurements`)."""
from __future__ import annotations

import argparse
import json
from typing import Callable

from sparsec.analysis.measurements import packaged, packaged_targets


def add_saved_run_arguments(parser: argparse.ArgumentParser, flag: str, kind: str, does: str,
                            written: str) -> None:
    """``flag [FILE|TARGET]`` (``does`` with an earlier run instead of measuring; the target
    defaults to h100) and ``--json PATH`` (write ``written`` there)."""
    targets = ", ".join(packaged_targets(kind))
    parser.add_argument(flag, nargs="?", const="h100", metavar="FILE|TARGET",
                        help=f"{does} instead of measuring: a --json file, or the run packaged for a "
                             f"target ({targets}; default h100)")
    parser.add_argument("--json", help=f"write {written} here")


def saved_or_measured(saved: str | None, kind: str, measure: Callable[[], dict]) -> dict:
    """The run ``saved`` names (a packaged target's ``<kind>_<target>.json``, else a file
    path), or a fresh ``measure()`` when ``saved`` is None."""
    if saved is None:
        return measure()
    data = packaged(kind, saved)
    if data is None:
        with open(saved) as f:
            data = json.load(f)
    return data


def write_run(path: str | None, data: dict) -> None:
    """Write ``data`` as JSON to ``path`` (nothing when None)."""
    if path:
        with open(path, "w") as f:
            json.dump(data, f, indent=1)
