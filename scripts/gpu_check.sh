#!/usr/bin/env bash
# The GPU check in one command, for a short GPU slot on a fresh machine with no network: picks a
# Python whose torch sees CUDA (.venv's first, else python3; a CPU-only torch is used, and said so,
# when none does), adds the packages that Python lacks from the wheels in build/gpu_wheels, and runs
# benchmarks/gpu_check.py with the arguments given (default budget 420 s: about 7.5 minutes in all).
# The report (report.json, report.md, console.log) goes to --out: by default $OUT/gpu_check where
# $OUT is set, else results/gpu_check. Exit status: gpu_check.py's (1 when a step failed).
set -uo pipefail
cd "$(dirname "$0")/.."

PROBE='import sys, torch
print(sys.version.split()[0], "torch", torch.__version__, "CUDA available:", torch.cuda.is_available())
sys.exit(0 if torch.cuda.is_available() else 3)'
PY="" FALLBACK="" INFO=""
for candidate in .venv/bin/python python3 python; do
    command -v "$candidate" >/dev/null 2>&1 || continue
    info=$("$candidate" -c "$PROBE" 2>/dev/null)
    case $? in
        0) PY=$candidate INFO=$info; break ;;
        3) [ -z "$FALLBACK" ] && FALLBACK=$candidate && INFO=$info ;;
    esac
done
PY=${PY:-$FALLBACK}
if [ -z "$PY" ]; then
    echo "gpu_check.sh: no Python with torch found (tried .venv/bin/python, python3, python)" >&2
    exit 2
fi
echo "== python: $PY ($INFO)"

export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
NEEDED="nibabel, monai, einops, safetensors, skimage, scipy, sklearn, matplotlib, tqdm"
if ! "$PY" -c "import $NEEDED" 2>/dev/null; then
    if ls build/gpu_wheels/*.whl >/dev/null 2>&1; then
        site=/tmp/pseudohealthy_site
        echo "== adding $(ls build/gpu_wheels/*.whl | xargs -n1 basename | tr '\n' ' ')to $site"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
            build/gpu_wheels/*.whl || exit 2
        export PYTHONPATH="$PYTHONPATH:$site"
    fi
    if ! "$PY" -c "import $NEEDED"; then
        echo "gpu_check.sh: $PY lacks packages the check needs (above); put their wheels in build/gpu_wheels" >&2
        exit 2
    fi
fi

out="" prev=""
for arg in "$@"; do
    case "$arg" in --out=*) out=${arg#--out=} ;; esac
    [ "$prev" = "--out" ] && out=$arg
    prev=$arg
done
extra=()
if [ -z "$out" ]; then
    out=${OUT:+$OUT/gpu_check}
    out=${out:-results/gpu_check}
    extra=(--out "$out")
fi
mkdir -p "$out"
"$PY" benchmarks/gpu_check.py ${extra[@]+"${extra[@]}"} "$@" 2>&1 | tee "$out/console.log"
exit "${PIPESTATUS[0]}"
