#!/usr/bin/env bash
# Creates .venv and installs m0lite with its test and server extras.
# torch is pinned and installed first: on CPU machines the pinned CPU wheel is
# what pip finds, while a bare `torch` requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
TORCH_SPEC="${M0LITE_TORCH:-torch==2.13.0}"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "$TORCH_SPEC"
.venv/bin/python -m pip install -q -e ".[test,serve,demo]"
