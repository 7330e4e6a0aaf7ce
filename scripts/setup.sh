#!/usr/bin/env bash
# One-time set-up on a fresh machine: the project, its test extras, and the CPU wheel of
# torch (pinned, so pip takes the local CPU build and never a CUDA one).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0 -e ".[test]"
