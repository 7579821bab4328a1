#!/usr/bin/env bash
# Every GPU throughput measurement of docs/benchmarks.md in one run (about 6 minutes on one H100/H200):
# bf16 autocast, torch.compile, fused AdamW, synthetic data of each preset's shape; JSON per preset, a
# torch.profiler table + chrome trace for the two DiTs, the graph breaks torch.compile reports, table.md.
#
#   bash scripts/gpu_benchmarks.sh OUT_DIR                      # on the GPU machine
#   DRY_RUN=1 bash scripts/gpu_benchmarks.sh /tmp/gpu_dry       # here: CPU, 1 step, tiny batches
#
# Then: scripts/estimate_training_cost.py model=nanoflow_h1024_d20 stages.masked.mask_ratio=0.75 stages.masked.epochs=240
#   stages.masked.benchmark=OUT_DIR/h1024_masked80.json stages.unmasked.mask_ratio=0 stages.unmasked.epochs=40
#   stages.unmasked.benchmark=OUT_DIR/h1024_unmasked20.json
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:?usage: gpu_benchmarks.sh OUT_DIR}"
mkdir -p "$OUT"
# What comes back from the device machine is at most 8 files: table.md, log.txt, the two profile tables
# and the two H1024 JSONs (for the cost estimator); every JSON stays in $WORK, chrome traces only with TRACE=1.
WORK="$(mktemp -d)"
PY="${PYTHON:-python3}"
H1024=imagenet256_latent_dit_m2_moe_layerwise_h1024_d20_e16_c2_moew05

if [[ "${DRY_RUN:-0}" == 1 ]]; then
  COMMON=(steps=1 warmup=1 device=cpu compile=false)
  XL_BATCH=2 H_BATCH=2 C_BATCH=4
else
  COMMON=(steps=30 warmup=10 device=cuda)
  XL_BATCH=256 H_BATCH=256 C_BATCH=512
fi

bench() {  # name, then benchmark_train.py arguments
  local name=$1; shift
  echo "== $name" | tee -a "$OUT/log.txt"
  $PY scripts/benchmark_train.py "${COMMON[@]}" "$@" out="$WORK/$name.json" >> "$OUT/log.txt" 2>&1 \
    || echo "FAILED: $name" | tee -a "$OUT/log.txt"
}

# The two DiTs also write a torch.profiler table (top ops by GPU time) and a chrome trace; TORCH_LOGS
# lists every graph break torch.compile takes in them.
export TORCH_LOGS=graph_breaks
bench dit_xl2 experiment=imagenet256_latent_dit_xl2 batch=$XL_BATCH profile="$OUT/profile_dit_xl2.txt"
bench h1024_masked80 experiment=${H1024}_masked80 batch=$H_BATCH profile="$OUT/profile_h1024_masked80.txt"
unset TORCH_LOGS
bench h1024_unmasked20 experiment=${H1024}_unmasked20 batch=$H_BATCH
# A flow-map step (the MeanFlow JVP on the math attention kernel, then the loss forward and backward)
# against the flow-matching step of the same DiT-B/2: the JVP's cost relative to a plain step.
bench dit_b2 experiment=imagenet256_latent_dit_b2 batch=$XL_BATCH
bench dit_b2_meanflow experiment=imagenet256_latent_dit_b2_meanflow batch=$XL_BATCH
bench cifar10_cfg experiment=cifar10_cfg batch=$C_BATCH
bench cifar10_cfg_b256 experiment=cifar10_cfg batch=256

cp "$WORK"/h1024_*.json "$OUT"/ 2>/dev/null || true
[[ "${TRACE:-0}" == 1 ]] || rm -f "$OUT"/*.trace.json
$PY - "$WORK" "$OUT" <<'EOF'
import json, pathlib, sys
work, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
rows = [json.loads(p.read_text()) | {"name": p.stem} for p in sorted(work.glob("*.json"))]
keys = ["name", "batch", "images_per_s", "ms_per_step", "achieved_tflops", "mfu", "peak_memory_mb"]
lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
for r in rows:
    lines.append("| " + " | ".join(f"{r.get(k):.4g}" if isinstance(r.get(k), float) else str(r.get(k)) for k in keys) + " |")
(out / "table.md").write_text("\n".join(lines) + "\n\n" + json.dumps(rows, indent=1) + "\n")
print("\n".join(lines))
EOF
