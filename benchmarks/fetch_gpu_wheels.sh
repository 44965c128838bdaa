#!/usr/bin/env bash
# Wheels for a lent GPU machine (the workplace's `device` tool), which has Python 3.12, PyTorch, einops, hypothesis
# and pytest but none of d4func's other needs and no package index. Saves them into .whl/ (git-ignored; ~5 MiB,
# inside the 64 MiB a device call may carry). dm_control and mujoco (83 MiB together) do not fit: the device checks
# (benchmarks/gpu_session.sh) train on Reach, which needs no renderer. Run once, here, where pip reaches an index:
#   bash benchmarks/fetch_gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
mkdir -p .whl
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${tag}_x86_64")
done
# Versions as pyproject.toml resolves them here; the GPU image's own torch (2.11) satisfies their ranges.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl \
  tensordict==0.14.3 torchrl==0.14.1 hoptorch==0.1.4 pyvers==0.2.3 orjson==3.13.0 importlib_metadata==10.2.0 lazy-importer==0.1.0 \
  omegaconf==2.3.0 lpips==0.1.4
# omegaconf needs antlr4-python3-runtime 4.9.*, published only as source: build its (pure Python) wheel here.
python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
ls -l .whl
