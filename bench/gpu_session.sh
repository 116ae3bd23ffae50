#!/usr/bin/env bash
# Everything this project checks and times on a GPU machine, in one go (for a device session of a few minutes).
#
#   OUT=/some/folder [STEPS="checks speed envcount coinrun"] bash bench/gpu_session.sh
#
# The steps' time limits add up to about 34 minutes (checks 9, speed 7, envcount 9, coinrun 9). Each step fits one
# device call (at most 10 minutes); a session with 15 minutes of device time runs one or two steps, one call each.
# Installs the working tree (no dependencies: the machine's NumPy, SciPy, CuPy, torch, hypothesis and pytest are
# used), then runs the steps named in STEPS (default: all), each part with its own time limit and log under $OUT:
#   checks:
#     gpu_check.txt            bench/gpu_check.py: every CuPy path against the NumPy oracle, then kernel timings
#     pytest_cupy.txt          the CuPy-only tests (skipped in CI) with the rest of their modules, the edge cases
#                              (subnormal gradients among them) on every backend
#     cifar10_epoch.txt        bench/bench_cifar10_epoch.py: one epoch of the CIFAR-10 loop, plain vs AND-mask
#     torch_env_gradients.txt  bench/bench_torch_env_gradients.py on cuda: per-environment gradients vs the authors'
#                              (eager engines; the MLP's compiled engine is the speed step's)
#   speed:
#     torch_env_speed.txt      bench/bench_torch_env_gradients.py (a) on the CPU (1 thread and all cores) and on cuda
#                              in one run: the MLP AND-mask step of every engine against the authors' loop, eager and
#                              compiled (reduce-overhead: CUDA graphs; default), with the compile times and a closing
#                              summary of the ratios (target: 10x on both)
#     per_example_floor.txt    bench/bench_per_example_floor.py on cuda, FastResNet at full width, batch 80: the
#                              per-example engines against their floor (a forward and 80 backward passes)
#   envcount:
#     env_count.txt            `hardtovary env-count --implementation accel` on CuPy in float32, Fig. 15 at the
#                              paper's scale: 2 to 4096 environments, 5 runs of ERM and the AND-mask each, every
#                              environment count one batched sweep, 4 of them at a time on the GPU; env_count_*
#                              its results.json, table.txt and plot. The run folder (/tmp/env-count) resumes: a
#                              second call while the machine is warm finishes what the first left
#   coinrun:
#     coinrun_label.txt        labelling on the machine's cores, only where Procgen imports there (procgen2 0.10.7
#                              ships a CPython 3.11 wheel only); otherwise the labels come with the working tree:
#                              make them beforehand on a CPU machine into $COINRUN_LABELS (default
#                              bench/coinrun-labels, ignored by git) and name that folder in the run's carry
#     coinrun_train.txt        `hardtovary coinrun train` of both methods with the paper's ResNet-18 (width 1) on
#                              cuda: the per-epoch cost and the KL curves; coinrun_results.json its results.json
set -u
OUT=${OUT:-/tmp/gpu_session}
STEPS=${STEPS:-checks speed envcount coinrun}
COINRUN_LABELS=${COINRUN_LABELS:-bench/coinrun-labels}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/hardtovary-site . \
    || { echo "install failed"; exit 3; }
export PYTHONPATH=/tmp/hardtovary-site
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import sys, numpy, scipy, cupy, torch; print('python', sys.version.split()[0], 'numpy', numpy.__version__,
'scipy', scipy.__version__, 'cupy', cupy.__version__, 'torch', torch.__version__)"; } 2>&1 | tee "$OUT/device.txt"
wants() { [[ " $STEPS " == *" $1 "* ]]; }
if wants checks; then
  timeout 240 python3 bench/gpu_check.py 2>&1 | tee "$OUT/gpu_check.txt"
  timeout 150 python3 -m pytest -q -p no:cacheprovider -rs tests/test_accel_rules.py tests/test_accel_quadratic.py \
      tests/test_sweep.py tests/test_edge_case_parity.py 2>&1 | tee "$OUT/pytest_cupy.txt"
  timeout 100 python3 bench/bench_cifar10_epoch.py --device cuda --n-train 8000 --n-test 1000 2>&1 \
      | tee "$OUT/cifar10_epoch.txt"
  timeout 60 python3 bench/bench_torch_env_gradients.py --devices cuda --repeats 5 --cuda-compile "" 2>&1 \
      | tee "$OUT/torch_env_gradients.txt"
fi
if wants speed; then
  timeout 300 python3 bench/bench_torch_env_gradients.py --devices cpu,cuda --skip-resnet --repeats 30 \
      --cuda-compile reduce-overhead,default 2>&1 | tee "$OUT/torch_env_speed.txt"
  timeout 120 python3 bench/bench_per_example_floor.py --device cuda --width 1 --batch 80 --repeats 5 2>&1 \
      | tee "$OUT/per_example_floor.txt"
fi
if wants envcount; then
  timeout 540 python3 -m hardtovary env-count --implementation accel --backend cupy --dtype float32 \
      --envs 2,4,8,16,32,64,128,256,512,1024,2048,4096 --runs 5 --workers 4 --no-progress --out /tmp/env-count 2>&1 \
      | tee "$OUT/env_count.txt"
  for f in results.json table.txt env_count.png; do cp "/tmp/env-count/$f" "$OUT/env_count_$f" 2>/dev/null; done
fi
if wants coinrun; then
  if python3 -c "import procgen" 2>/dev/null; then
    COINRUN_LABELS=/tmp/coinrun-labels
    timeout 240 python3 -m hardtovary coinrun label --train-levels 0:64 --states 250 \
        --test-levels 1000000:1000500 --workers 16 --no-progress --out "$COINRUN_LABELS" 2>&1 \
        | tee "$OUT/coinrun_label.txt"
  fi
  timeout 300 python3 -m hardtovary coinrun train --labels "$COINRUN_LABELS" --out /tmp/coinrun-train \
      --methods adam,and_mask --seeds 0 --epochs 8 --width 1 --device cuda --threads 0 --no-progress 2>&1 \
      | tee "$OUT/coinrun_train.txt"
  cp /tmp/coinrun-train/results.json "$OUT/coinrun_results.json" 2>/dev/null
fi
echo "gpu_session done"
