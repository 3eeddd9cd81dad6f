#!/usr/bin/env bash
# Wall time of `train.py --dry-run` for every shipped recipe on synthetic data, as a user would run it on a
# login node's CPU; the target is under 60 s each on 2 cores. Writes benchmarks/results/dry_run/summary.md.
#
#   bash benchmarks/dry_run_times.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results/dry_run
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
mkdir -p "$out"
{
  echo "CPU: $(bash benchmarks/cpu_name.sh), $(nproc --all) cores, OMP_NUM_THREADS=${OMP_NUM_THREADS:-unset}; $(date -u +%Y-%m-%d)"
  echo
  echo '| recipe | dry-run wall time (s) | estimated step time |'
  echo '|---|---|---|'
  for recipe in $(ls recipes/*.yaml | xargs -n1 basename | sed 's/\.yaml$//'); do
    args=(--set data.dataset=synthetic --set data.synthetic_train_size=16384 --set model.pretrained_path=null)
    if grep -q '^distill:' "recipes/$recipe.yaml"; then  # a random teacher of the right shape times its share
      PYTHONPATH=. python benchmarks/random_teacher.py "$recipe" "$scratch/$recipe.teacher.safetensors" "${args[@]}"
      args+=(--set "distill.teacher_path=$scratch/$recipe.teacher.safetensors")
    fi
    start=$EPOCHREALTIME
    status=0
    python train.py --recipe "$recipe" --dry-run --device cpu --output "$scratch/$recipe" "${args[@]}" \
      > "$scratch/$recipe.txt" 2>&1 || status=$?
    seconds=$(awk "BEGIN {print $EPOCHREALTIME - $start}")
    step=$(sed -n 's/^  \([0-9.e+]* s per optimizer step\).*/\1/p' "$scratch/$recipe.txt")
    [ "$status" = 0 ] || step="FAILED (exit $status): $(tail -1 "$scratch/$recipe.txt")"
    printf '| %s | %.1f | %s |\n' "$recipe" "$seconds" "$step"
  done
} | tee "$out/summary.md"
