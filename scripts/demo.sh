#!/usr/bin/env bash
# The main job on the bundled sample data: set up .venv (scripts/setup.sh), restore the bundled
# BraTS FLAIR scan with the bundled demo ensemble at the library's default sampler and steps
# (pseudohealthy.engine.defaults; SAMPLER=... STEPS=... override them; SSIM=unit maps with data
# range 1 instead of the reference's SSIM constants), and score the anomaly map against its lesion
# mask. Outputs go to ${1:-demo_output}/ (the inputs are never touched).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-demo_output}
CHOICE=()
[ -n "${SAMPLER:-}" ] && CHOICE+=(--sampler "$SAMPLER")
[ -n "${STEPS:-}" ] && CHOICE+=(--steps "$STEPS")
[ "${SSIM:-}" = unit ] && CHOICE+=(--unit-ssim)

bash scripts/setup.sh
SCAN=sample_data/brats2013_pat0006_flair.nii.gz
LESION=sample_data/brats2013_pat0006_lesion.nii.gz

echo "== restoring $SCAN with sample_data/demo_ensemble (${SAMPLER:-default sampler}, ${STEPS:-default} steps)"
.venv/bin/pseudohealthy restore "$SCAN" --ensemble sample_data/demo_ensemble -o "$OUT" \
    "${CHOICE[@]}" --lesion-mask "$LESION" --overwrite
echo "== evaluating the anomaly map against the lesion mask"
.venv/bin/pseudohealthy evaluate --scans "$SCAN" --masks "$LESION" --restorations "$OUT" \
    -o "$OUT/evaluation" --overwrite
echo "== done: $OUT/brats2013_pat0006_flair_preview.png shows the most anomalous slices;"
echo "   open everything in napari with: .venv/bin/pseudohealthy view $SCAN"
