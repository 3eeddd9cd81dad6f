#!/usr/bin/env bash
# One device call: install DALI (parts carried in earlier calls, in /tmp/up), then the rows issue 26 and 24 need.
# Results in $OUT/r (tarred at the end into $OUT/results.tgz) and a running summary in $OUT/summary.txt.
set -u
export PYTHONUNBUFFERED=1
T0=$SECONDS
R=/tmp/r; mkdir -p $R/logs $R/json
say() { echo "[$((SECONDS - T0)) s] $*" | tee -a $OUT/summary.txt; }
finish() { tar -czf $OUT/results.tgz -C $R . 2>/dev/null; say "done"; }
trap finish EXIT

if [ "${SKIP_SETUP:-0}" != 1 ]; then
  cat /tmp/up/p0 /tmp/up/p1 .up/p2 > /tmp/dali.tar.xz || { say "missing parts: $(ls /tmp/up)"; exit 3; }
  SP=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  mkdir -p /tmp/site && python3 -c "import tarfile; tarfile.open('/tmp/dali.tar.xz').extractall('/tmp/site')" \
    || { say "extract failed"; exit 3; }
  [ -f "$SP/nvidia/__init__.py" ] || rm -f /tmp/site/nvidia/__init__.py
  cp -r /tmp/site/. "$SP/" || { say "copy to $SP failed"; exit 3; }
  python3 -m pip install -q --no-index --no-deps --upgrade .up/timm-*.whl > $R/logs/pip.log 2>&1
  say "setup: $(python3 -c 'import torch, timm, nvidia.dali as d; print("torch", torch.__version__, "timm", timm.__version__, "dali", d.__version__, torch.cuda.get_device_name())' 2>&1 | tail -1)"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >> $OUT/summary.txt
echo "cpus $(nproc)" >> $OUT/summary.txt

# step NAME LIMIT CMD...: run under timeout, log to logs/NAME.log
step() {
  local name=$1 limit=$2; shift 2
  local left=$((${BUDGET:-520} - (SECONDS - T0)))
  if [ "$left" -lt 30 ]; then say "$name: skipped, budget spent"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t=$SECONDS
  timeout -k 5 "$limit" "$@" > $R/logs/$name.log 2>&1
  say "$name: exit $? in $((SECONDS - t)) s (limit $limit)"
  grep -E "img/s|model only|input|end to end|saved|ratio|phase|px|top-1" $R/logs/$name.log | tail -25 >> $OUT/summary.txt
}

# a compiled run can linger after writing its JSON (compile workers shutting down): stop it once the JSON is there
step_json() {
  local name=$1 limit=$2 json=$3; shift 3
  local left=$((${BUDGET:-520} - (SECONDS - T0)))
  if [ "$left" -lt 60 ]; then say "$name: skipped, budget spent"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t=$SECONDS
  timeout -k 5 "$limit" "$@" > $R/logs/$name.log 2>&1 &
  local pid=$!
  while kill -0 $pid 2>/dev/null; do
    if [ -s "$json" ]; then sleep 3; kill -- $pid 2>/dev/null; pkill -f "mnv_train.bench" 2>/dev/null; break; fi
    sleep 1
  done
  wait $pid 2>/dev/null
  say "$name: json=$([ -s "$json" ] && echo yes || echo no) in $((SECONDS - t)) s (limit $limit)"
  grep -E "img/s|model only|input|end to end|compile" $R/logs/$name.log | tail -25 >> $OUT/summary.txt
}

DATA=/tmp/mnv_gpu_images
if [ ! -d $DATA/train ]; then
  PHOTO=$(python3 -c 'import matplotlib, os; print(os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data/sample_data/grace_hopper.jpg"))')
  step images 90 python3 benchmarks/make_images.py $DATA "$PHOTO" --train 40000 --val 256 --classes 10 --jobs 16
fi
B=(python3 -m mnv_train.bench --data-dir $DATA --device cuda --workers 16 --steps 40 --warmup 70)
DALI=(--set data.pipeline=dali --set aug.train_interpolation=bicubic)
step conv_small_224_dali 100 "${B[@]}" --recipe mnv4_conv_small --img-size 224 --batch-size 256 "${DALI[@]}" \
  --json $R/json/conv_small_224_dali.json
step conv_small_224_host 100 "${B[@]}" --recipe mnv4_conv_small --img-size 224 --batch-size 256 \
  --json $R/json/conv_small_224_host.json
step prog_dry_run 120 python3 train.py --recipe mnv4_hybrid_large_prog --dry-run --device cuda \
  --set data.dataset=synthetic --output /tmp/prog_dry
step_json hybrid_large_384_dali_compiled 220 $R/json/hybrid_large_384_dali_compiled.json "${B[@]}" \
  --recipe mnv4_hybrid_large --img-size 384 --batch-size 128 --set train.compile=true "${DALI[@]}" \
  --set aug.auto_augment=rand-m10-n2-mstd0-p1.0 --json $R/json/hybrid_large_384_dali_compiled.json
step hybrid_large_compile_modes 200 python3 -m mnv_train.bench --recipe mnv4_hybrid_large --device cuda \
  --set data.dataset=synthetic --img-size 384 --batch-size 128 --steps 20 --warmup 5 \
  --compile-modes eager,reduce-overhead --json $R/json/hybrid_large_compile_modes.json
