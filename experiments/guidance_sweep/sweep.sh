#!/usr/bin/env bash
# Guidance sweep on one checkpoint: CFG scale and guidance interval (the 28x28 recipe study in
# experiments/fashion_mnist.md, "Unseen 28x28 data").
#   bash experiments/guidance_sweep/sweep.sh CKPT OUTROOT N_PER_CLASS CLASSIFIER "g:lo:hi g:lo:hi ..." [num_steps]
# One inference.py call per setting (32 Heun steps unless num_steps is given, seed 0), scored with
# CLASSIFIER -> OUTROOT/g{g}_{lo}_{hi}/metrics.json; one summary line per setting on stdout.
set -euo pipefail
ckpt=$1 outroot=$2 n=$3 clf=$4 settings=$5 steps=${6:-32}
export OMP_NUM_THREADS=1
for s in $settings; do
  IFS=: read -r g lo hi <<<"$s"
  out=$outroot/g${g}_${lo}_${hi}_n${n}_s${steps}
  mkdir -p "$outroot"
  if [ ! -f "$out/metrics.json" ]; then
    start=$(date +%s)
    .venv/bin/python inference.py checkpoint="$ckpt" out="$out" n_per_class="$n" guidance_scale="$g" \
      guidance_interval="[$lo,$hi]" num_steps="$steps" classifier="$clf" device=cpu > "$out.log" 2>&1
    echo "$(( $(date +%s) - start ))" > "$out/wall_s"
  fi
  python3 - "$out" "$g" "$lo" "$hi" <<'PY'
import json, sys
m = json.load(open(sys.argv[1] + "/metrics.json"))
print(f"g={sys.argv[2]} interval=[{sys.argv[3]},{sys.argv[4]}] acc={m['classifier_accuracy']:.3f} "
      f"fd={m['classifier_fd']:.2f} floor={m['classifier_fd_real_floor']:.2f} wall_s={open(sys.argv[1] + '/wall_s').read().strip()}")
PY
done
