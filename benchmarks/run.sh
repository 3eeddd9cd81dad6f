#!/usr/bin/env bash
# Reproduces benchmarks/results/: the three throughput figures of `python -m mnv_train.bench` for
# mnv4_conv_small@224 and mnv4_hybrid_large@384, and timm's own train.py on the same images and recipe values.
#
#   bash benchmarks/run.sh [DATA_DIR] [TIMM_TRAIN_PY]
#
# DATA_DIR: an ImageNet-style folder (train/, validation/). Without one, a 2000-image JPEG folder is made
# from photos found on this machine (benchmarks/make_images.py).
# TIMM_TRAIN_PY: timm's train.py (from a checkout of pytorch-image-models); the comparison is skipped without it.
# A shared machine drifts by several percent over minutes, so mnv-train and timm run alternately, ROUNDS times,
# and summary.md gives the medians. The defaults (batch, steps, workers) suit a 2-core CPU: set BATCH_SMALL,
# BATCH_LARGE, STEPS, WORKERS, ROUNDS, DEVICE to change them.
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-/tmp/mnv_bench_images}
timm_train=${2:-}
out=benchmarks/results
device=${DEVICE:-auto}
workers=${WORKERS:-2}
steps=${STEPS:-40}
batch=${BATCH_SMALL:-32}
mkdir -p "$out"
rm -f "$out"/*.json

if [ ! -d "$data/train" ]; then
  photos=$(python - <<'PY'
import glob, os, matplotlib
found = [os.path.join(os.path.dirname(matplotlib.__file__), 'mpl-data/sample_data/grace_hopper.jpg')]
found += sorted(glob.glob('/root/.rustup/toolchains/*/share/doc/rust/html/embedded-book/assets/*.jp*g'))[:2]
print(' '.join(p for p in found if os.path.getsize(p) > 20000))
PY
)
  python benchmarks/make_images.py "$data" $photos --train 2000 --val 200
fi
timm_device=$device
[ "$timm_device" = auto ] && timm_device=$(python -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')

for round in $(seq 1 "${ROUNDS:-3}"); do
  python -m mnv_train.bench --recipe mnv4_conv_small --data-dir "$data" --device "$device" --workers "$workers" \
    --batch-size "$batch" --steps "$steps" --warmup 3 --json "$out/mnv4_conv_small_224.round$round.json"
  if [ -n "$timm_train" ]; then
    # the values of recipes/mnv4_conv_small.yaml; one log line per step, timed over the same steps as bench.py
    # timm's train.py dies of a broken pipe once grep has the lines it needs, hence the `|| true`
    { python "$timm_train" --data-dir "$data" --model mobilenetv4_conv_small --img-size 224 -b "$batch" \
      --device "$timm_device" --opt adamw --opt-eps 1e-6 --lr 0.002 --weight-decay 0.01 --sched-on-updates \
      --warmup-epochs 5 --aa rand-m9-n2-mstd0-p0.5 --smoothing 0.1 --drop 0.3 --bn-momentum 0.05 --bn-eps 1e-6 \
      --model-ema --model-ema-decay 0.9999 --channels-last --workers "$workers" --epochs 1 --log-interval 1 \
      --output "$(mktemp -d)" 2>&1 || true; } | grep -m $((steps + 4)) 'Train:' \
      | python benchmarks/timm_rate.py --skip 3 --steps "$steps" > "$out/timm_train_conv_small_224.round$round.json"
  fi
done
python -m mnv_train.bench --recipe mnv4_hybrid_large --data-dir "$data" --device "$device" --workers "$workers" \
  --batch-size "${BATCH_LARGE:-8}" --steps "${STEPS_LARGE:-6}" --warmup 2 --json "$out/mnv4_hybrid_large_384.json"
python benchmarks/summarize.py "$out" > "$out/summary.md"
cat "$out/summary.md"
