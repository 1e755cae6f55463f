#!/usr/bin/env bash
# GPU check for lossland: device info, kernel tests on the GPU, scaling / curvature /
# memory benchmark JSON. About 5 minutes on an H100; downloads nothing.
#
# The GPU machine has no network. Its image ships JAX with the CUDA plugin, flax,
# optax, orbax-checkpoint, absl-py, scipy, matplotlib and pytest (as `python3`), but
# not `mnist1d`, nor the Fashion-MNIST files. So, once, on a machine that has them
# (the dev machine with .venv):
#
#     bash benchmarks/gpu_check.sh --prepare       # fills .gpu_carry/ (~31 MB)
#
# and then run this script on the GPU machine with .gpu_carry carried along
# (.gitignore ignores it), e.g. with the device
# tool: command 'bash benchmarks/gpu_check.sh 2>&1 | tee $OUT/gpu_check.log',
# carry [".gpu_carry"], timeout 600
# (on an H100, 2026-11-27, the sections took 6 + 74 (tests) + 88 (scaling, both models)
# + 86 (curvature, both workloads) + 47 (memory) s; the tracking section, added
# 2026-12-06, has not run on a GPU yet: with its 150 s timeout the sections' timeouts
# sum to 750 s, so under a 600 s limit set LOSSLAND_CHECK_SKIP=scaling_cnn to skip
# the CNN scaling run).
# lossland itself is used from the source tree (PYTHONPATH), not pip-installed: no
# `pip install -e '.[test]' "jax[cuda12]"` is possible offline there, and none is
# needed while the image's JAX/flax/optax/orbax are recent enough (setup.cfg's floors).
# Results are printed and, when $OUT is set, written under $OUT as well.
set -uo pipefail
cd "$(dirname "$0")/.."
CARRY=.gpu_carry

if [[ "${1:-}" == "--prepare" ]]; then
    PY=${PYTHON:-.venv/bin/python}
    mkdir -p "$CARRY/fashion-mnist" "$CARRY/site" "$CARRY/cache"
    cp /usr/share/datasets/fashion-mnist/*-ubyte.gz "$CARRY/fashion-mnist/"
    # mnist1d is pure Python: copy the installed package.
    cp -r "$("$PY" -c 'import mnist1d, os; print(os.path.dirname(mnist1d.__file__))')" \
        "$CARRY/site/"
    # Pre-generate the MNIST-1D blocks the tests use.
    LOSSLAND_CACHE="$CARRY/cache" "$PY" -c \
        'from lossland import data; data.load("mnist1d", 8000); data.load("mnist1d", 100, split="test")'
    du -sh "$CARRY"
    git check-ignore -q "$CARRY" || echo "note: add /.gpu_carry/ to .gitignore (it must not be committed)"
    exit 0
fi

PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/lossland_gpu_check}   # results: at most 8 files (the device tool's limit)
LOGS=$(mktemp -d)                        # stderr of the benchmarks, shown when one fails
# A dry run of this script on a machine without a GPU:
#     PYTHON=.venv/bin/python LOSSLAND_CHECK_PLATFORM=cpu LOSSLAND_CHECK_QUICK=1 \
#         bash benchmarks/gpu_check.sh
PLATFORM=${LOSSLAND_CHECK_PLATFORM:-cuda}
QUICK=()
[[ -n "${LOSSLAND_CHECK_QUICK:-}" ]] && QUICK=(--quick)
mkdir -p "$OUT"
export PYTHONPATH="$PWD:$PWD/$CARRY/site${PYTHONPATH:+:$PYTHONPATH}"
export LOSSLAND_CACHE="$PWD/$CARRY/cache"
export XLA_PYTHON_CLIENT_PREALLOCATE=false   # tests and benchmarks start several processes
export PYTHONUNBUFFERED=1
FASHION="$PWD/$CARRY/fashion-mnist"
[[ -d "$FASHION" ]] || FASHION=/usr/share/datasets/fashion-mnist
status=0
T0=$SECONDS
section() { echo "== [$((SECONDS - T0)) s] $*"; }

section "device"
nvidia-smi -L 2>/dev/null || echo "nvidia-smi: not available"
JAX_PLATFORMS=$PLATFORM "$PY" - <<'PYEOF' 2>&1 | tee "$OUT/device.txt" \
    || { echo "JAX cannot start: is this a JAX-with-CUDA python?"; exit 1; }
import jax, jaxlib, flax, optax, numpy, orbax.checkpoint as ocp
print({"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
       "optax": optax.__version__, "orbax": getattr(ocp, "__version__", "?"),
       "numpy": numpy.__version__,
       "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
       "device_kind": jax.devices()[0].device_kind})
stats = jax.devices()[0].memory_stats()
print(stats and {k: v for k, v in stats.items() if k in ("bytes_limit", "peak_bytes_in_use")})
PYEOF

section "kernel tests on the device (JAX_PLATFORMS=$PLATFORM): float64 dense oracles, chunking, train step"
# test_sharding.py is left out: its multi-device checks run on fake CPU devices in
# subprocesses (one GPU cannot be split), which CI already does.
# With pytest-xdist (the GPU image has it), 4 workers share the GPU and compile in parallel.
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 4)
JAX_PLATFORMS=$PLATFORM timeout 150 "$PY" -m pytest -q -p no:cacheprovider "${XDIST[@]}" \
    tests/test_curvature.py tests/test_objective.py tests/test_train.py \
    2>&1 | tee "$OUT/pytest.txt" | tail -n 25
[[ ${PIPESTATUS[0]} -eq 0 ]] || status=1

# One process per model, so that a slow CNN cannot lose the MLP's figures.
for model in mlp cnn; do
    [[ ",${LOSSLAND_CHECK_SKIP:-}," == *",scaling_$model,"* ]] && { section "skipped: scaling $model"; continue; }
    section "scaling benchmark: $model (absolute times, Fashion-MNIST n=60000, tracked run, TF32 comparison)"
    timeout $([[ $model == mlp ]] && echo 100 || echo 140) "$PY" -m benchmarks.scaling \
        --platform=auto --models=$model --data_dir="$FASHION" "${QUICK[@]}" \
        --output="$OUT/scaling_$model.json" >/dev/null 2>"$LOGS/scaling_$model.err" \
        && cat "$OUT/scaling_$model.json" || { status=1; tail -n 20 "$LOGS/scaling_$model.err"; }
done

section "curvature benchmark, MNIST-1D 2x512 (HVP/grad, Lanczos overhead, stopping rule, warm start)"
JAX_PLATFORMS=$PLATFORM timeout 120 "$PY" -m benchmarks.curvature --workloads=mnist1d \
    "${QUICK[@]}" >"$OUT/curvature.json" \
    && cat "$OUT/curvature.json" || status=1   # its progress lines go to stderr, shown here

section "tracking benchmark (issues 13, 24): Lanczos cold/warm, block solver, eigsh, LOBPCG along a GD run; the stream tracker"
# Fashion-MNIST MLP 784-512-512-10, n=5000, k=10, tol 1e-2, 50 tracked steps (200 on a
# longer budget), every contender in this one process; then the stream tracker's figures
# (stream_step_ratio, stream_eig_rel_err[_max] for k = 1, 10; on a GPU the k = 1 ratio
# target is <= 1.3, not the CPU's 2.0 that `targets` checks).
JAX_PLATFORMS=$PLATFORM timeout 300 "$PY" -m benchmarks.tracking --steps=50 --stream_steps=150 \
    --data_dir="$FASHION" "${QUICK[@]}" --out="$OUT/tracking.json" >/dev/null \
    2>"$LOGS/tracking.err" && cat "$OUT/tracking.json" || { status=1; tail -n 20 "$LOGS/tracking.err"; }

section "memory benchmark (grad and HVP; device peak bytes)"
JAX_PLATFORMS=$PLATFORM timeout 90 "$PY" -m benchmarks.memory --n=5000,60000 \
    --data_dir="$FASHION" --output="$OUT/memory.json" >/dev/null 2>"$LOGS/memory.err" \
    && cat "$OUT/memory.json" || { status=1; tail -n 20 "$LOGS/memory.err"; }

section "gpu_check: $([[ $status -eq 0 ]] && echo OK || echo FAILED)"
exit $status
