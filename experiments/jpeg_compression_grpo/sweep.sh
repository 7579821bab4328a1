#!/bin/bash
# The digits JPEG-GRPO sweep of experiment.md: kl_beta, rollout guidance and a combined reward.
# Needs the seed and classifier of experiments/digits.md (runs/digits_cfg, runs/classifiers/digits.safetensors).
# Two runs at a time, one thread each (2-core CPU): about 25 minutes in all.
#   bash experiments/jpeg_compression_grpo/sweep.sh [OUT_DIR=runs/grpo_sweep]
OUT=${1:-runs/grpo_sweep}
COMMON="experiment=digits_grpo_jpeg seed_checkpoint=runs/digits_cfg device=cpu training.progress=false"
CLASSIFIER=runs/classifiers/digits.safetensors
mkdir -p "$OUT"
printf '%s\n' \
  "kl0 grpo.kl_beta=0" \
  "kl0.01 grpo.kl_beta=0.01" \
  "kl0.1 grpo.kl_beta=0.1" \
  "kl0.3 grpo.kl_beta=0.3" \
  "kl1 grpo.kl_beta=1" \
  "kl10 grpo.kl_beta=10" \
  "kl1_guided grpo.kl_beta=1 grpo.guidance_scale=3 grpo.detach_uncond=false" \
  "combined_kl0 grpo.kl_beta=0 reward=jpeg_and_classifier reward.terms.1.reward.classifier=$CLASSIFIER" \
  "combined_w0.3_kl0 grpo.kl_beta=0 grpo.epochs=200 reward=jpeg_and_classifier reward.terms.1.weight=0.3 reward.terms.1.reward.classifier=$CLASSIFIER" |
  xargs -P 2 -L 1 bash -c 'name=$0; OMP_NUM_THREADS=1 uv run python train_grpo.py '"$COMMON"' training.run_dir='"$OUT"'/$name "$@" > '"$OUT"'/$name.log 2>&1; echo "$name exit $?"'
