#!/usr/bin/env bash
# Every GPU check of issue #5 in one run, sized to fit a short device lease: the core stages'
# limits add up to 555 s (under 560), inside one device command (600 s), leaving room for the
# machine's start; `DRY_RUN=1` prints the stages and their limits without running them.
#
#   bash benchmarks/gpu_session.sh --fetch-wheels   # here, with pip access: diffusers into .whl/
#   PIDRT_GIT_COMMIT=<hash> bash benchmarks/gpu_session.sh [core|tuning|served|retouch]   # on the GPU machine
#
# core (default): the checks and headline numbers of #5. tuning, for a later lease once core has
# run: tile sweeps of both kernels (fp16, bf16) and the UNet step with torch.compile inside the
# graphs (its first compile of the SD1.5 UNet takes minutes, hence a lease of its own).
# served: the served path on the fast backend: `pidrt serve --backend fast` (SD1.5 shapes, random
# weights, fp16, every bucket captured before /readyz) under benchmarks/serve_load.py at batch 1
# and 8, against the bare Generator on the same backend (identity-less requests: the face
# detector's packages are not on the GPU machine). Needs the serving wheels (--fetch-wheels).
# retouch: Layout-and-Retouch at SD1.5 shapes, 50 DDIM steps, fp16 (benchmarks/bench_retouch.py):
# the four ways of serving its guide paths, UNet calls and seconds per image, and how far the
# cheap ones move the images. The core set's limits already add up to 555 s, hence a set of its own.
#
# The GPU machine has torch, Triton, numpy, transformers, safetensors, pytest-timeout but no
# diffusers and no package registry, so diffusers (pure Python; the only missing import on Python
# 3.12) travels as a wheel in .whl/ and pidrt runs from the checkout (PYTHONPATH). Stages run in
# order, each under its own time limit, and a stage that fails or times out does not stop the
# next one: one lease should bring back everything that worked. The pytest stage is stopped with
# SIGINT first (pytest then still writes the JUnit report of the tests that finished; SIGTERM
# would leave none), SIGKILL only if it has not ended 15 s later; each test has its own limit
# where pytest-timeout is installed, so one hung test cannot take the stage. $OUT (default
# ./gpu-session) gets
#   session.log      everything printed, the environment, each stage's exit status and seconds
#   results.tar.gz   every stage's files (JUnit XML of the GPU tests, each benchmark's json + md),
#                    re-packed after each stage so a run cut short still brings back what it did
#   *.md             the benchmarks' tables, to read without unpacking
# (the device tool brings back at most eight files). The checkout travels without .git, so the
# results name the commit from PIDRT_GIT_COMMIT (benchmarks/common.py).
set -uo pipefail
cd "$(dirname "$0")/.."

DIFFUSERS=diffusers==0.42.1  # the version the CPU machines test against (environment-facts.md)

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 -d .whl "$DIFFUSERS" || exit 1
    # The HTTP stack for the served set, with its dependencies (pydantic-core is a compiled wheel).
    python3 -m pip download --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 -d .whl fastapi uvicorn httpx prometheus-client python-multipart || exit 1
    ls -l .whl
    exit 0
fi

SET=${1:-core}
[[ "$SET" == core || "$SET" == tuning || "$SET" == served || "$SET" == retouch ]] \
    || { echo "unknown stage set '$SET': core, tuning, served or retouch"; exit 2; }
OUT=${OUT:-$PWD/gpu-session}
RES=$([[ -n "${DRY_RUN:-}" ]] && echo "$OUT/results" || mktemp -d)
mkdir -p "$OUT"
exec > >(tee -a "$OUT/session.log") 2>&1
export PYTHONUNBUFFERED=1
if [[ -z "${DRY_RUN:-}" ]] && compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "installing the carried wheels failed"; exit 1; }
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi

declare -a SUMMARY
stage() {  # stage [--int] NAME SECONDS COMMAND...  (--int: SIGINT at the limit, then SIGKILL 15 s later)
    local signal=TERM grace=5
    [[ "$1" == --int ]] && { signal=INT; grace=15; shift; }
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    echo "=== $name (limit ${limit}s) $(date -u +%H:%M:%S)"
    if [[ -n "${DRY_RUN:-}" ]]; then
        echo "timeout --signal=$signal -k $grace $limit $*"
        return 0
    fi
    timeout --signal="$signal" -k "$grace" "$limit" "$@"
    rc=$?
    [[ $rc == 124 || $rc == 137 ]] && echo "=== $name TIMED OUT after ${limit}s"
    SUMMARY+=("$name rc=$rc $((SECONDS - start))s")
    echo "=== $name rc=$rc in $((SECONDS - start))s"
    tar -czf "$OUT/results.tar.gz" -C "$RES" . && cp "$RES"/*.md "$OUT"/ 2>/dev/null
    return 0
}

stage env 40 bash -c 'nvidia-smi; python3 -c "
import torch, triton, diffusers, transformers
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__,
      \"diffusers\", diffusers.__version__, \"transformers\", transformers.__version__)
print(torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))"; python3 -m pidrt.cli doctor
echo "commit ${PIDRT_GIT_COMMIT:-unknown}"'
if [[ "$SET" == tuning ]]; then
    stage kernels-sweep 140 python3 benchmarks/bench_kernels.py --out "$RES/kernels_sweep" --sweep
    stage kernels-sweep-bf16 70 python3 benchmarks/bench_kernels.py --out "$RES/kernels_sweep_bf16" --sweep \
        --dtype bf16
    stage unet-step-compile 300 python3 benchmarks/bench_unet_step.py --out "$RES/unet_step_compile" --compile \
        --cases base,sca,eaa --profile
    echo "=== summary"
    printf '%s\n' "${SUMMARY[@]}"
    exit 0
fi
if [[ "$SET" == retouch ]]; then
    # Eight retouches per variant (a warm-up, 2 timed, 2 compared seeds, and the paper form's
    # images), 50 steps each, eager (CUDA graphs cannot hold per-step edits): ~4 min on an H200.
    stage retouch 300 python3 benchmarks/bench_retouch.py --out "$RES/retouch_sd15" --preset sd15 --device cuda \
        --steps 50 --images 2 --repeats 2
    echo "=== summary"
    printf '%s\n' "${SUMMARY[@]}"
    exit 0
fi
if [[ "$SET" == served ]]; then
    # auto on the GPU: fast kept after its check against the reference, every bucket captured at start.
    stage --int pytest-gpu-served 60 python3 -m pytest -m gpu -q -rfE -p no:cacheprovider \
        --junitxml="$RES/pytest-gpu-served.xml" tests/engines/test_choose.py
    # Each: server start (SD1.5 random weights, buckets captured) + load + the bare Generator.
    for B in 1 8; do
        stage "serve-fast-b$B" 225 python3 benchmarks/serve_load.py --backend fast --preset sd15 --device cuda \
            --dtype float16 --methods none --identities 0 --size 512 --steps 20 --n 1 --max-batch "$B" \
            --concurrency $((2 * B)) --requests $((6 * B)) --max-wait-ms 50 --ready-timeout-s 150 \
            --time-limit-s 80 --out "$RES/serve_fast_b$B"
    done
    # serve_load writes into a folder per run: its table beside the others, then repack.
    for B in 1 8; do cp "$RES/serve_fast_b$B/serve_load.md" "$RES/serve_fast_b$B.md" 2>/dev/null; done
    tar -czf "$OUT/results.tar.gz" -C "$RES" . && cp "$RES"/*.md "$OUT"/ 2>/dev/null
    echo "=== summary"
    printf '%s\n' "${SUMMARY[@]}"
    exit 0
fi
# A limit per test (pytest-timeout, where installed); tests run in the order named, so the slow
# SD1.5 step test (the last of test_fast_torch.py) is the one an interrupted stage loses.
# `on_device`: the kernel tests that run in the interpreter on CPU machines, compiled here.
PER_TEST=()
python3 -c "import pytest_timeout" 2>/dev/null && PER_TEST=(--timeout=100)
stage --int pytest-gpu 180 python3 -m pytest -m "gpu or on_device" -q -rfE --durations=15 -p no:cacheprovider \
    "${PER_TEST[@]}" --junitxml="$RES/pytest-gpu.xml" tests/kernels tests/identity/test_device_cache.py \
    tests/runtime/test_eaa_feed.py tests/engines/test_fused_norms.py tests/engines/test_fast_torch.py
stage kernels 55 python3 benchmarks/bench_kernels.py --out "$RES/kernels"
# Besides the fast backend: with the fused GroupNorm+SiLU kernel (off by default until this
# measures it), without the Triton kernels (EAA as two SDPA calls: is the fused pass worth it?)
# and without channels_last (the default, unmeasured; torch's GroupNorm converts it back).
stage unet-step 170 python3 benchmarks/bench_unet_step.py --out "$RES/unet_step" --profile \
    --variants fast,fused-norms,no-kernels,nchw
stage generation 110 python3 benchmarks/bench_generation.py --out "$RES/generation"

echo "=== summary"
printf '%s\n' "${SUMMARY[@]}"
