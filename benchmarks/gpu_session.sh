#!/usr/bin/env bash
# Every GPU check of d4func in one command, for a lent GPU machine (the workplace's `device` tool: 15 minutes of
# device time per session, start-up included, 10 minutes per command). Prepared here, where there is no GPU:
#
#   bash benchmarks/fetch_gpu_wheels.sh                 # once, here: .whl/ (git-ignored, ~5 MiB)
#   device run: command "bash benchmarks/gpu_session.sh", carry [".whl"], timeout_s 560
#
# Steps, most valuable first, each under its own time limit so that a slow one cannot eat the rest (~535 s in all):
#   setup        install the carried wheels into /tmp/site (the machine has torch, einops, hypothesis, pytest)
#   test_gpu     tests/test_gpu.py's quick checks: CUDA float32 vs CPU, bf16 with fused attention only, KV cache
#   paper_scale  run_all.py gpu_paper_scale: tokens/s, MFU and generated frames/s at a paper-like size (554M)
#   train_gpu    a short `d4func train` on Reach with device=cuda, bf16, fused attention only and torch.compile
#                (Reach needs no renderer: dm_control does not fit the 64 MiB a call may carry)
#   compiled     run_all.py gpu_compiled: the train step eager vs compiled, at the paper-like width (4 layers)
# tests/test_gpu.py's compiled-loss test is left out for time; `compiled` compares compiled and eager losses too.
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
      f"torchrl {torchrl.__version__} cudnn {torch.backends.cudnn.version()} | {gpu}")
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
pytest_gpu=("$python" -m pytest tests/test_gpu.py -v --tb=short -p no:cacheprovider -o addopts="")
step test_gpu 90 "${pytest_gpu[@]}" -k "float32 or bf16 or kv_cached"
step paper_scale 120 "$python" benchmarks/run_all.py --only gpu_paper_scale --section-timeout 100 \
  --out "$out/run_all_gpu_paper_scale.json"
step train_gpu 180 env D4FUNC_GPU_TEST_TIMEOUT=170 "${pytest_gpu[@]}" -k every_precision_flag
step compiled 130 "$python" benchmarks/run_all.py --only gpu_compiled --section-timeout 110 \
  --out "$out/run_all_gpu_compiled.json"
if [ ${#failed[@]} -gt 0 ]; then
  echo "failed: ${failed[*]}"
  exit 1
fi
echo "all GPU checks passed; results in $out"
