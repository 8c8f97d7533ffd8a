#!/bin/bash
# The evidence comparison at a larger scale on one GPU (conf/experiment/evidence_mt10_gpu.yaml):
# 16 runs packed on the GPU, then the report tables (held-out loss and success, paired against the
# random-swap control). Generate the data beforehand on a CPU (`make gpu-data`) and bring data/ along;
# without it the first step generates it here with every core (minutes).
#
#   bash tools/gpu_evidence.sh                     # K = 16 runs on each GPU (all of them on one GPU)
#   PACK="hydra.launcher.max_parallel=2" bash tools/gpu_evidence.sh device=cpu ...   # elsewhere: 2 at a time
#
# Extra arguments are overrides for every run (e.g. train.steps=5000). Prints the sweep folder first.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
PACK=${PACK:-hydra.launcher.jobs_per_gpu=16}
SWEEP=${SWEEP:-multirun/evidence_mt10_gpu/$(date -u +%Y-%m-%d_%H-%M-%S)}
echo "sweep: $SWEEP"
start=$(date +%s)
# the data (reused when complete: a few seconds)
$PYTHON tools/run.py recipe=make_data data=mt10_near data.workers="${DATA_WORKERS:-$(nproc)}" threads=1 \
    $(printf '%s\n' "$@" | grep -E "^(data\.|data_root=|debug=)" || true)
$PYTHON tools/run.py -m experiment=evidence_mt10_gpu hydra/launcher=local $PACK hydra.launcher.timeout_min="${TIMEOUT_MIN:-8}" \
    "hydra.sweep.dir=$SWEEP" "$@" || echo "warning: some runs failed (listed above); the report covers the others"
for metric in heldout_mse success; do
    $PYTHON tools/report.py "$SWEEP" --rows method --metric "$metric" --baseline method=harmodt_random
done
echo "done in $(( $(date +%s) - start )) s: $SWEEP/reports"
