#!/usr/bin/env bash
# Trains the shipped default model (fluorescence nuclei) with the project's own command line, on
# the CPU, and measures it on the held-out validation set. Usage, from the repository root:
#   bash training/train_default.sh [TIME_BUDGET_SECONDS] [ENCODING]
# INIT=PATH continues training from an existing model (fine-tuning learning rate, a fresh
# warm-up + cosine schedule) instead of starting from random weights.
# Reads ../shared/data/dsb2018/fluo (see ../shared/data/README.md); writes
# src/napari_unet_studio/pretrained/default.safetensors and training/default_eval.json.
set -euo pipefail
cd "$(dirname "$0")/.."
BUDGET=${1:-4200}
ENCODING=${2:-foreground}
INIT=${INIT:-none}
DATA=${DATA:-../shared/data/dsb2018/fluo}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# Hold out every 20th training image (15 of 300) for model selection and post-processing
# tuning; fluo/val stays untouched for the final measurement.
mkdir -p "$WORK"/{train,select}/{images,labels}
i=0
for f in "$DATA"/train/images/*.png; do
  name=$(basename "$f")
  part=train
  if (( i % 20 == 0 )); then part=select; fi
  ln -s "$(realpath "$f")" "$WORK/$part/images/$name"
  ln -s "$(realpath "$DATA/train/labels/$name")" "$WORK/$part/labels/$name"
  i=$((i + 1))
done

OUT=src/napari_unet_studio/pretrained/default.safetensors
mkdir -p "$(dirname "$OUT")"
if [[ "$INIT" != none ]]; then cp "$INIT" "$WORK/init.safetensors"; INIT="$WORK/init.safetensors"; fi
start=$(date +%s)
unet-studio train --images "$WORK/train/images" --labels "$WORK/train/labels" \
  --val-images "$WORK/select/images" --val-labels "$WORK/select/labels" --val-every 250 \
  --out "$WORK/default.safetensors" --init "$INIT" --arch unet --encoding "$ENCODING" \
  --time-budget "$BUDGET" --device cpu --seed 0 \
  --note "DSB 2018 stage 1 fluorescence nuclei (CC0), 285 training images, 15 for model selection"
echo "training took $(( $(date +%s) - start )) s"
python training/tune_postprocess.py "$WORK/default.safetensors" "$WORK/select/images" "$WORK/select/labels"
python training/calibrate_uncertainty.py "$WORK/default.safetensors" "$WORK/select/images"
cp "$WORK/default.safetensors" "$OUT"

unet-studio predict "$DATA/val/images" --output "$WORK/pred" --model "$OUT" --device cpu -q
unet-studio evaluate "$WORK/pred" "$DATA/val/labels" | tee training/default_eval.json
