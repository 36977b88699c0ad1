#!/usr/bin/env bash
# The GPU checks of fasterase, run on a lent GPU machine (../shared/device/README.md) from the
# repository root, with the wheels of ../shared/device/wheels.sh carried in .whl/:
# build the CUDA kernels in place, run the `gpu` op tests, then the GPU benchmarks.
# Logs and the benchmark JSON go to $OUT (or ./device-out). Exits 1, naming the failed parts, when
# the build, a GPU test or a benchmark fails or runs out of time (pytest's rc 124 / 137: timed out).
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
failed=()
# sm_90 only (the lent machines are H100 / H200): each architecture of setup.py's 8.0;9.0+PTX
# compiles every kernel again
TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 timeout 300 python3 setup.py build_ext --inplace >"$OUT/build.log" 2>&1
rc=$?
echo "build: rc $rc in $((SECONDS - start)) s" | tee -a "$OUT/gpu.txt"
tail -3 "$OUT/build.log"
python3 -c "import fasterase._C as c, sys; sys.exit(0 if c.has_cuda else 1)" || rc=1  # a CPU-only build is a failure
((rc == 0)) || { echo "fasterase._C with CUDA not built: $OUT/build.log"; exit 1; }
start=$SECONDS
timeout "${TEST_TIMEOUT:-200}" python3 -m pytest -q -m gpu -p no:cacheprovider -rfs --maxfail=200 tests \
  >"$OUT/gpu-tests-full.log" 2>&1
rc=$?
tail -n 80 "$OUT/gpu-tests-full.log" >"$OUT/gpu-tests.log"
echo "gpu tests: rc $rc in $((SECONDS - start)) s" | tee -a "$OUT/gpu.txt"
tail -n 45 "$OUT/gpu-tests.log"
((rc == 0)) || failed+=("gpu tests (rc $rc)")
start=$SECONDS
timeout "${BENCH_TIMEOUT:-200}" python3 -m pytest -q -p no:cacheprovider bench --benchmark-only -k "cuda or gpu" \
  --benchmark-json "$OUT/bench.json" >"$OUT/bench.log" 2>&1
rc=$?
echo "bench: rc $rc in $((SECONDS - start)) s" | tee -a "$OUT/gpu.txt"
grep -E "passed|failed|Error" "$OUT/bench.log" | tail -n 15
((rc == 0)) || failed+=("benchmarks (rc $rc)")
[[ -f "$OUT/bench.json" ]] && python3 bench/report.py "$OUT/bench.json" | tee "$OUT/bench.md"
if ((${#failed[@]})); then
  echo "FAILED: ${failed[*]}" | tee -a "$OUT/gpu.txt"
  exit 1
fi
echo "PASSED: build, gpu tests, benchmarks" | tee -a "$OUT/gpu.txt"
