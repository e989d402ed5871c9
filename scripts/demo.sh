#!/usr/bin/env bash
# The main job on the bundled sample data: set up .venv (scripts/setup.sh), restore the bundled
# BraTS FLAIR scan with the bundled demo ensemble, and score the anomaly map against its lesion
# mask. Outputs go to ${1:-demo_output}/ (the inputs are never touched). DDIM, 7 steps: about 50 s
# on a 2-core CPU once the environment exists.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-demo_output}
SAMPLER=${SAMPLER:-ddim}
STEPS=${STEPS:-7}

bash scripts/setup.sh
SCAN=sample_data/brats2013_pat0006_flair.nii.gz
LESION=sample_data/brats2013_pat0006_lesion.nii.gz

echo "== restoring $SCAN with sample_data/demo_ensemble ($SAMPLER, $STEPS steps)"
.venv/bin/pseudohealthy restore "$SCAN" --ensemble sample_data/demo_ensemble -o "$OUT" \
    --sampler "$SAMPLER" --steps "$STEPS" --lesion-mask "$LESION" --overwrite
echo "== evaluating the anomaly map against the lesion mask"
.venv/bin/pseudohealthy evaluate --scans "$SCAN" --masks "$LESION" --restorations "$OUT" \
    -o "$OUT/evaluation" --overwrite
echo "== done: $OUT/brats2013_pat0006_flair_preview.png shows the most anomalous slices;"
echo "   open everything in napari with: .venv/bin/pseudohealthy view $SCAN"
