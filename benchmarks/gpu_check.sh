#!/usr/bin/env bash
# GPU check for lossland: device info, kernel tests on the GPU, scaling / curvature /
# memory benchmark JSON. About 5 minutes; downloads nothing.
#
# The GPU machine has no network. Its image ships JAX with the CUDA plugin, flax,
# optax, orbax-checkpoint, absl-py, scipy, matplotlib and pytest (as `python3`), but
# not `mnist1d`, nor the Fashion-MNIST files. So, once, on a machine that has them
# (the dev machine with .venv):
#
#     bash benchmarks/gpu_check.sh --prepare       # fills .gpu_carry/ (~31 MB)
#
# and then run this script on the GPU machine with .gpu_carry carried along
# (it must be git-ignored: add `/.gpu_carry/` to .gitignore), e.g. with the device
# tool: command "bash benchmarks/gpu_check.sh", carry [".gpu_carry"], timeout 420.
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
OUT=${OUT:-/tmp/lossland_gpu_check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD:$PWD/$CARRY/site${PYTHONPATH:+:$PYTHONPATH}"
export LOSSLAND_CACHE="$PWD/$CARRY/cache"
export XLA_PYTHON_CLIENT_PREALLOCATE=false   # tests and benchmarks start several processes
export PYTHONUNBUFFERED=1
FASHION="$PWD/$CARRY/fashion-mnist"
[[ -d "$FASHION" ]] || FASHION=/usr/share/datasets/fashion-mnist
status=0

echo "== device"
nvidia-smi -L 2>/dev/null || echo "nvidia-smi: not available"
"$PY" - <<'EOF' || { echo "JAX cannot start: is this a JAX-with-CUDA python?"; exit 1; }
import jax, jaxlib, flax, optax, orbax.checkpoint as ocp
print({"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
       "optax": optax.__version__, "orbax": ocp.__version__,
       "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
       "device_kind": jax.devices()[0].device_kind})
print(jax.devices()[0].memory_stats() and {k: v for k, v in jax.devices()[0].memory_stats().items()
                                          if k in ("bytes_limit", "peak_bytes_in_use")})
EOF

echo "== kernel tests on the GPU (JAX_PLATFORMS=cuda)"
tests=()
for t in tests/test_curvature.py tests/test_objective.py tests/test_train.py tests/test_sharding.py; do
    [[ -f "$t" ]] && tests+=("$t")
done
# test_sharding.py runs its multi-device checks on fake CPU devices in subprocesses
# (one GPU cannot be split); here it checks this image's JAX version.
JAX_PLATFORMS=cuda timeout 170 "$PY" -m pytest -q -x -p no:cacheprovider "${tests[@]}" \
    2>&1 | tee "$OUT/pytest.txt" | tail -n 25
[[ ${PIPESTATUS[0]} -eq 0 ]] || status=1

echo "== scaling benchmark (GPU: absolute times, Fashion-MNIST n=60000, MLP and CNN)"
timeout 150 "$PY" -m benchmarks.scaling --platform=gpu --data_dir="$FASHION" \
    --output="$OUT/scaling.json" >/dev/null 2>"$OUT/scaling.err" \
    && cat "$OUT/scaling.json" || { status=1; tail -n 20 "$OUT/scaling.err"; }

if [[ -f benchmarks/curvature.py ]]; then
    echo "== curvature benchmark (--quick)"
    timeout 60 "$PY" -m benchmarks.curvature --quick 2>"$OUT/curvature.err" \
        | tee "$OUT/curvature.json" || { status=1; tail -n 20 "$OUT/curvature.err"; }
fi

echo "== memory benchmark (grad; device peak bytes on the GPU)"
timeout 60 "$PY" -m benchmarks.memory --n=5000,60000 --kernels=grad --data_dir="$FASHION" \
    --output="$OUT/memory.json" >/dev/null 2>"$OUT/memory.err" \
    && cat "$OUT/memory.json" || { status=1; tail -n 20 "$OUT/memory.err"; }

echo "== gpu_check: $([[ $status -eq 0 ]] && echo OK || echo FAILED)"
exit $status
