#!/usr/bin/env bash
# GPU check for the kernels, on a machine with torch + triton + CUDA (about 5-8 minutes):
#   1. tests/test_kernels.py on CUDA (the real Triton kernels, bf16 included),
#   2. bench_attention.py (with a Triton tile sweep) and bench_rms_norm.py,
#   3. a short summary table, printed last.
# Logs and CSVs go to $OUT if set, else bench/results/gpu-check-<date>/.
#
# Installs nothing. If the machine's python3 has no pytest, it uses a pure-python copy
# from this checkout's .venv, e.g. by carrying these paths to the device machine:
#   .venv/lib/python3.11/site-packages/{pytest,_pytest,pluggy,iniconfig,packaging,pygments}
# Usage: bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RES=${OUT:-bench/results/gpu-check-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$RES"
status=0

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpu', torch.cuda.is_available() and torch.cuda.get_device_name())"
$PY -c "import torch; assert torch.cuda.is_available()" || { echo "no CUDA device: nothing to check"; exit 1; }

if ! $PY -c "import pytest" 2>/dev/null; then
    shim=$(mktemp -d)
    for pkg in pytest _pytest pluggy iniconfig packaging pygments; do
        src=$(ls -d .venv/lib/python3*/site-packages/$pkg 2>/dev/null | head -1)
        [ -n "$src" ] && ln -s "$PWD/$src" "$shim/$pkg"
    done
    export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
    $PY -c "import pytest" 2>/dev/null && echo "(pytest taken from .venv)" || echo "pytest not available: tests skipped"
fi

echo "== tests/test_kernels.py on CUDA"
if $PY -c "import pytest" 2>/dev/null; then
    timeout 300 $PY -m pytest -q -rfs -p no:cacheprovider tests/test_kernels.py 2>&1 | tee "$RES/test_kernels.log"
    [ "${PIPESTATUS[0]}" = 0 ] || { status=1; echo "TESTS FAILED"; }
fi

echo "== bench_attention"
timeout 240 $PY bench/bench_attention.py --sweep --out "$RES" 2>&1 | tee "$RES/bench_attention.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1

echo "== bench_rms_norm"
timeout 240 $PY bench/bench_rms_norm.py --out "$RES" 2>&1 | tee "$RES/bench_rms_norm.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1

echo "== summary (Triton vs the best torch provider; results in $RES)"
$PY - "$RES" <<'EOF'
import csv, glob, sys
from collections import defaultdict

def load(pattern):
    paths = [p for p in sorted(glob.glob(f"{sys.argv[1]}/{pattern}")) if "-sweep-" not in p]
    rows = [r for path in paths for r in csv.DictReader(open(path))]
    by_workload = defaultdict(dict)
    for r in rows:
        by_workload[r["workload"]][r["provider"]] = r
    return by_workload

for pattern, unit in (("attention-*.csv", "tflops"), ("rms_norm-*.csv", "gbs")):
    print(f"\n{'workload':<24} {'triton ' + unit:>13} {'% peak':>7} {'best torch':>13} {'x best torch':>12} {'ok':>4}")
    for workload, provs in load(pattern).items():
        t = provs.get("triton")
        others = [p for name, p in provs.items() if name != "triton"]
        if not t or not others:
            continue
        best = max(others, key=lambda p: float(p[unit]))
        ratio = float(best["ms"]) / float(t["ms"])
        print(f"{workload:<24} {float(t[unit]):>13.1f} {float(t['pct_peak']):>7.1f} "
              f"{best['provider'] + ' ' + format(float(best[unit]), '.1f'):>13} {ratio:>12.2f} {t['ok']:>4}")
EOF
echo
[ $status = 0 ] && echo "GPU CHECK PASSED" || echo "GPU CHECK: FAILURES (see logs above)"
exit $status
