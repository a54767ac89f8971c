#!/usr/bin/env bash
# The GPU checks in one run, for a machine with CUDA (e.g. the lent H200): the gpu-marked tests, the default
# cuDNN diff on BC-100, TF32 against no-cuDNN, and the cat->conv sweep on CUDA. Results land in $OUT.
# Usage: OUT=/some/dir scripts/gpu_check.sh   (PYTHON defaults to python3, which must hold a CUDA torch)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-work/gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
$PY -c "import torch; assert torch.cuda.is_available(), 'CUDA is not available'; \
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), \
torch.cuda.get_device_name())" || exit 2
rc=0
$PY -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest-gpu.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
$PY -m densenet_debug diff --json "$OUT/diff-cudnn.json" --html "$OUT/diff-cudnn.html" || rc=1
$PY -m densenet_debug diff --a tf32 --b no-cudnn --json "$OUT/diff-tf32.json" || rc=1
$PY -m densenet_debug sweep cat-conv --device cuda --json "$OUT/sweep-cat-conv.json" || rc=1
exit $rc
