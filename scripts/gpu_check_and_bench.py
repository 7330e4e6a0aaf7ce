#!/usr/bin/env python3
"""One device run: the GPU tests of the attention kernels, then the attention benchmark.

    python3 scripts/gpu_check_and_bench.py [--no-tests] [--no-bench] [--kernels] -- <bench args>

Full logs go under $OUT (pytest.log, bench.log, bench.json; with --kernels also a tarball
of the generated kernel sources); the short benchmark table is printed last.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path


def run(command: list[str], log: Path) -> int:
    start = time.time()
    with open(log, "w") as f:
        done = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    print(f"[{time.time() - start:6.1f} s] rc={done.returncode}: {' '.join(command)}", flush=True)
    return done.returncode


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-tests", action="store_true")
    parser.add_argument("--no-bench", action="store_true")
    parser.add_argument("--kernels", action="store_true", help="keep the generated kernel sources")
    parser.add_argument("bench_args", nargs="*")
    args = parser.parse_args()
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("SPARSEC_CACHE_DIR", str(Path("/tmp/sparsec-cache")))
    subprocess.run([sys.executable, "-c", "import torch, triton; print(torch.__version__, triton.__version__, "
                    "torch.cuda.get_device_name())"])
    status = 0
    if not args.no_tests:
        status |= run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/test_triton_kernels.py",
                       "-p", "no:cacheprovider"], out / "pytest.log")
        print("".join(open(out / "pytest.log").readlines()[-15:]), flush=True)
    if not args.no_bench:
        status |= run([sys.executable, "-m", "sparsec.bench",
                       "--json", str(out / "bench.json"), *args.bench_args], out / "bench.log")
        lines = open(out / "bench.log").read().splitlines()
        table = [i for i, line in enumerate(lines) if line.startswith("case ")]
        print("\n".join(lines[table[-1]:] if table else lines[-40:]), flush=True)
    if args.kernels:
        with tarfile.open(out / "kernels.tar.gz", "w:gz") as tar:
            tar.add(os.environ["SPARSEC_CACHE_DIR"], arcname="kernels")
    return status


if __name__ == "__main__":
    sys.exit(main())
