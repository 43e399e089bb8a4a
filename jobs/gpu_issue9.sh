#!/usr/bin/env bash
# Issue 9's GPU rows in one call on the lent GPU machine (JAX there; TensorFlow is not installed).
#
#     bash jobs/gpu_carry.sh                          # here, once: builds .whl/
#     device run, carry [".whl"], timeout_s 560:  bash jobs/gpu_issue9.sh
#
# (1) the extraction core alone at 400x500 bf16, batches of 128 (bench_core); (2) the Ray
# pipeline over 20,000 images, cold, warm and +10 % (bench_pipeline; the +10 % run starts with
# the compilation cache the cold run filled); (3) the start-up timeline, first without the
# compilation cache, then with it (bench_startup). Each writes its Markdown section into $OUT.
# SMOKE=1 runs the same steps small (a CPU machine with JAX will do); CARRY= skips the install
# of the carried wheels (a machine that has emotr's packages already).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
CARRY=${CARRY-.whl}
if [[ -n $CARRY ]]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$CARRY"/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export KERAS_BACKEND=jax XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
if [[ ${SMOKE:-0} == 1 ]]; then
    n_core=64 n_pipeline=96 n_faces=16 n_startup=32 size=64x80 batch=16
else
    n_core=4096 n_pipeline=20000 n_faces=512 n_startup=512 size=400x500 batch=128
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"

step() {  # a step's time limit, then its command; a step that fails does not stop the others
    local limit=$1
    shift
    echo "== $* ($(date +%T))"
    timeout "$limit" "$@" || echo "== failed or timed out: $*"
}
step 120 python3 jobs/bench_core.py --size "$size" --precisions bfloat16 --batch-sizes "$batch" \
    --n "$n_core" --n-files "$n_faces" --results "$OUT"
step 240 python3 jobs/bench_pipeline.py --n "$n_pipeline" --n-faces "$n_faces" --size "$size" \
    --precision bfloat16 --batch-size "$batch" --keras-backend jax --results "$OUT"
step 150 python3 jobs/bench_startup.py --n "$n_startup" --size "$size" --image-size "$size" \
    --batch-size "$batch" --decode-batch-size 16 --keras-backend jax --results "$OUT"
ls -la "$OUT"
