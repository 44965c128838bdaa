#!/usr/bin/env bash
# Every GPU check of d4func in one command, for a lent GPU machine (the workplace's `device` tool: 15 minutes of
# device time per session, start-up included, 10 minutes per command). Prepared here, where there is no GPU:
#
#   bash benchmarks/fetch_gpu_wheels.sh                 # once, here: .whl/ (git-ignored, ~5 MiB)
#   device run: command "bash benchmarks/gpu_session.sh", carry [".whl"], timeout_s 560
#
# Steps, each with its own time limit so that a slow one cannot eat the rest (about 8 minutes in all):
#   1. install the carried wheels into /tmp/site (the machine has torch, einops, hypothesis, pytest; not the rest)
#   2. tests/test_gpu.py: CUDA float32 vs CPU, bf16 with fused attention only, KV cache, torch.compile, and a short
#      `d4func train` on Reach with every precision flag (no renderer needed: dm_control does not fit the carry)
#   3. benchmarks/run_all.py --only gpu_paper_scale,gpu_compiled: tokens/s, MFU, generated frames/s at a
#      paper-like size, and eager vs torch.compile
# Everything lands in $OUT (the device tool's folder that comes back) or runs/gpu_session.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/gpu_session}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
  export PYTHONPATH="$PWD:/tmp/site"
fi
"$python" - <<'PY' 2>&1 | tee "$out/versions.txt"
import platform, torch, tensordict, torchrl
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
print(f"python {platform.python_version()} torch {torch.__version__} tensordict {tensordict.__version__} "
      f"torchrl {torchrl.__version__} | {gpu}")
PY
failed=()
step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $out/NAME.txt, remember failures
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit} s)"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || failed+=("$name (exit $rc)")
}
step test_gpu 300 "$python" -m pytest tests/test_gpu.py -q -p no:cacheprovider -o addopts="" --durations=0
step run_all_gpu 200 "$python" benchmarks/run_all.py --only gpu_paper_scale,gpu_compiled --section-timeout 180 \
  --out "$out/run_all_gpu.json"
if [ ${#failed[@]} -gt 0 ]; then
  echo "failed: ${failed[*]}"
  exit 1
fi
echo "all GPU checks passed; results in $out"
