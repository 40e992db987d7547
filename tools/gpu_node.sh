#!/usr/bin/env bash
# On an offline GPU node, in a copy of the checkout with .gpu/ (tools/pack_gpu.sh): train and
# evaluate the given depths with the pipeline's own stages (train_var under Ray Train's
# TorchTrainer, one GPU worker per depth; evaluate), tracking to a journal instead of MLflow, and
# pack each depth's metrics, records, sample grid, log and journal into OUT/gpu-dD.tar.gz as soon
# as that depth is done (also when one of its stages failed: what exists is packed).
#   tools/gpu_node.sh PARAMS OUT DEPTH...            e.g. tools/gpu_node.sh profiles/gpu.yaml /tmp/out 16
#   PARALLEL=4 tools/gpu_node.sh PARAMS OUT 6 8 10 12   four depths side by side on one GPU (one Ray
#                                                       cluster; train.ray.resources_per_worker.GPU <= 1/4)
set -euo pipefail
cd "$(dirname "$0")/.."
params=$1 out=$2
shift 2
export PYTHONUNBUFFERED=1 VARSCALE_TRACKING=journal:runs/gpu/journal
# the journal names the commit the runs belong to (a copy without .git: set VARSCALE_GIT_COMMIT)
[ -n "${VARSCALE_GIT_COMMIT:-}" ] || export VARSCALE_GIT_COMMIT=$(git rev-parse HEAD 2>/dev/null || echo unknown)
if [ -d .gpu/whl ] && ! python3 -c "import ray.train, torch_fidelity" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
(cd .gpu && sha256sum -c --quiet SHA256SUMS)
[ -d data/tokens ] || tar -xJf .gpu/tokens.tar.xz
[ -f data/images/val.npy ] || tar -xJf .gpu/val.tar.xz
mkdir -p models logs/gpu
for f in .gpu/models/*.pt; do [ -f "models/${f##*/}" ] || cp "$f" models/; done
python3 -m pipeline.stages.check_params --params "$params" --out runs/gpu/params-check.json

depth() {   # train, evaluate and pack one depth
  local d=$1 rc=0
  python3 -m pipeline.stages.train_var --params "$params" --depth "$d" --tokenizer models/tokenizer.pt \
    --tokens data/tokens --model-out "models/gpu/var-d$d.pt" --metrics-out "metrics/gpu/train/d$d.json" \
    --curve-out "metrics/gpu/train/d$d-curve.json" --run-out "runs/gpu/train/d$d.json" || rc=$?
  [ $rc -ne 0 ] || python3 -m pipeline.stages.evaluate --params "$params" --depth "$d" \
    --model "models/gpu/var-d$d.pt" --tokenizer models/tokenizer.pt --classifier models/classifier.pt \
    --images data/images --metrics "metrics/gpu/eval/d$d.json" --record "runs/gpu/eval/d$d.json" \
    --grid "metrics/gpu/eval/samples-d$d.png" || rc=$?
  tar -czf "$out/gpu-d$d.tar.gz" --ignore-failed-read "metrics/gpu/train/d$d.json" \
    "metrics/gpu/train/d$d-curve.json" "runs/gpu/train/d$d.json" "metrics/gpu/eval/d$d.json" \
    "runs/gpu/eval/d$d.json" "metrics/gpu/eval/samples-d$d.png" "logs/gpu/d$d.txt" runs/gpu/journal 2>/dev/null || true
  echo "d$d: exit $rc"
  return $rc
}

if [ "${PARALLEL:-1}" -gt 1 ]; then   # one cluster for the depths running side by side
  export RAY_AUTH_MODE=token   # as the stages ask for it (pipeline.training.driver.init_ray): a token first
  python3 -m ray.scripts.scripts get-auth-token --generate >/dev/null
  python3 -m ray.scripts.scripts start --head --disable-usage-stats --include-dashboard=false >/dev/null
  trap 'python3 -m ray.scripts.scripts stop --force >/dev/null 2>&1 || true' EXIT
fi
failed=0 running=0
for d in "$@"; do
  depth "$d" > "logs/gpu/d$d.txt" 2>&1 &
  running=$((running + 1))
  if [ "$running" -ge "${PARALLEL:-1}" ]; then wait -n || failed=1; running=$((running - 1)); fi
done
while [ "$running" -gt 0 ]; do wait -n || failed=1; running=$((running - 1)); done
grep -h "done in\|exit\|Error" logs/gpu/d*.txt | grep -v "^\s*(" || true
exit $failed
