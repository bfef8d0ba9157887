#!/usr/bin/env bash
# The paper's EM check: train a U-Net from scratch on ISBI 2012 (16 of the 20 training slices),
# segment the 4 held-out slices (every 5th) and report pixel error and adapted Rand error next to
# the paper's 0.0611 / 0.0382 (those are on the challenge's own test set: indicative only).
# Usage, from the repository root:  bash training/isbi2012.sh [TIME_BUDGET_SECONDS]
# Reads ../shared/data/isbi2012/train; writes training/isbi2012_eval.json.
set -euo pipefail
cd "$(dirname "$0")/.."
BUDGET=${1:-1200}
DATA=${DATA:-../shared/data/isbi2012/train}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK"/{train,test}/{images,labels}
i=0
for f in "$DATA"/images/*.png; do
  name=$(basename "$f")
  part=train
  if (( i % 5 == 0 )); then part=test; fi
  ln -s "$(realpath "$f")" "$WORK/$part/images/$name"
  ln -s "$(realpath "$DATA/labels/$name")" "$WORK/$part/labels/$name"
  i=$((i + 1))
done
start=$(date +%s)
# The labels are cell masks (membrane = background): their connected components are the cells.
unet-studio train --images "$WORK/train/images" --labels "$WORK/train/labels" \
  --out "$WORK/isbi.safetensors" --init none --arch unet --encoding foreground \
  --time-budget "$BUDGET" --device cpu --seed 0 --note "ISBI 2012 EM, 16 training slices"
echo "training took $(( $(date +%s) - start )) s"
unet-studio predict "$WORK/test/images" --output "$WORK/pred" --model "$WORK/isbi.safetensors" --device cpu -q
unet-studio evaluate "$WORK/pred" "$WORK/test/labels" | tee training/isbi2012_eval.json
