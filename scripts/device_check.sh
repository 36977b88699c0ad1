#!/usr/bin/env bash
# The GPU checks of fasterase, run on a lent GPU machine (../shared/device/README.md) from the
# repository root, with the wheels of ../shared/device/wheels.sh carried in .whl/:
# build the CUDA kernels in place, run the `gpu` op tests, then the GPU benchmarks.
# Logs and the benchmark JSON go to $OUT (or ./device-out).
set -uo pipefail
OUT=${OUT:-device-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
ln -sfn ../kernels fasterase/kernels  # what `pip install -e .` maps (setup.py package_dir)
start=$SECONDS
TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 timeout 300 python3 setup.py build_ext --inplace >"$OUT/build.log" 2>&1
echo "build: rc $? in $((SECONDS - start)) s" | tee -a "$OUT/gpu.txt"
tail -3 "$OUT/build.log"
start=$SECONDS
timeout "${TEST_TIMEOUT:-200}" python3 -m pytest -q -m gpu -p no:cacheprovider -rf --maxfail=200 tests \
  2>&1 | tail -n 80 >"$OUT/gpu-tests.log"
echo "gpu tests: $((SECONDS - start)) s" | tee -a "$OUT/gpu.txt"
tail -n 45 "$OUT/gpu-tests.log"
start=$SECONDS
timeout "${BENCH_TIMEOUT:-200}" python3 -m pytest -q -p no:cacheprovider bench --benchmark-only -k "cuda or gpu" \
  --benchmark-json "$OUT/bench.json" >"$OUT/bench.log" 2>&1
echo "bench: $((SECONDS - start)) s" | tee -a "$OUT/gpu.txt"
grep -E "passed|failed|Error" "$OUT/bench.log" | tail -n 15
python3 bench/report.py "$OUT/bench.json" | tee "$OUT/bench.md"
