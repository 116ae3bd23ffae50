#!/usr/bin/env bash
# Everything this project checks and times on a GPU machine, in one go (for a device session of a few minutes).
#
#   OUT=/some/folder bash bench/gpu_session.sh
#
# Installs the working tree (no dependencies: the machine's NumPy, SciPy, CuPy, torch, hypothesis and pytest are
# used), then, each step with its own time limit and log under $OUT:
#   gpu_check.txt            bench/gpu_check.py: every CuPy path against the NumPy oracle, then kernel timings
#   pytest_cupy.txt          the CuPy-only tests (skipped in CI) with the rest of their modules
#   cifar10_epoch.txt        bench/bench_cifar10_epoch.py: one epoch of the CIFAR-10 loop, plain vs AND-mask
#   torch_env_gradients.txt  bench/bench_torch_env_gradients.py on cuda: per-environment gradients vs the authors'
set -u
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/hardtovary-site . \
    || { echo "install failed"; exit 3; }
export PYTHONPATH=/tmp/hardtovary-site
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import sys, numpy, scipy, cupy, torch; print('python', sys.version.split()[0], 'numpy', numpy.__version__,
'scipy', scipy.__version__, 'cupy', cupy.__version__, 'torch', torch.__version__)"; } 2>&1 | tee "$OUT/device.txt"
timeout 240 python3 bench/gpu_check.py 2>&1 | tee "$OUT/gpu_check.txt"
timeout 150 python3 -m pytest -q -p no:cacheprovider -rs tests/test_accel_rules.py tests/test_accel_quadratic.py \
    tests/test_sweep.py 2>&1 | tee "$OUT/pytest_cupy.txt"
timeout 100 python3 bench/bench_cifar10_epoch.py --device cuda --n-train 8000 --n-test 1000 2>&1 \
    | tee "$OUT/cifar10_epoch.txt"
timeout 60 python3 bench/bench_torch_env_gradients.py --devices cuda --repeats 5 2>&1 \
    | tee "$OUT/torch_env_gradients.txt"
echo "gpu_session done"
