#!/usr/bin/env bash
# Named benchmark suites for a GPU machine. JSON lines on stdout (one per measurement), progress on stderr.
#
#   bash benchmarks/suite.sh SUITE [SUITE...]
#
#   train     our training step (the trainer's TrainStep and execution plan) at the paper depths:
#             d16 and d20 at batch 64, d24 at 32, d30 at 32 with 10 of 30 blocks recomputed
#   sample    our sampler at B=64 and B=1 (CFG 1.5, top-k 900, top-p 0.96, decode included) and the
#             token check (the uncompiled static engine draws the plain loop's tokens)
#   official  the official code's training step and sampler (OFFICIAL_ROOT: a FoundationVision/VAR checkout)
#   versus    official then ours in one call: training d16/64 and d24/32, sampling d16/64 and d24/64, and
#             the ratios (benchmarks/ratios.py); the comparison benchmarks/RESULTS.md reports. Each run
#             also samples the SM clock and power (--clocks): at a power limit the clock, not the kernels,
#             can set the ratio
#   depths    versus at every paper depth, one call per depth (official then ours, then the ratios):
#             training d16 and d20 at batch 64, d24 and d30 at 32; sampling at B=64. DEPTHS="16 20 24 30"
#   latency   our sampler at B=1 (one image, CFG on, decode included) at d16 and d30
#   energy    where a training step's joules go (benchmarks/energy_parts.py: matmuls, attention, the norm
#             kernels, each back to back at the power limit) beside the step's own joules (--clocks),
#             d20 at batch 64 and d24 at 32; needs NVML's energy counter
#   switch    sampling at B=64 then B=1 in one process, once per variant with one fast path switched off
#             (benchmarks/batch_switch.py, d16): round 25's illegal memory access with and without its fix
#   numerics  bf16 fast path against the fp32 plain path over 30 steps, beside the same drift of
#             eager bf16 (the official code's roundings) and of the fast path with a float32 residual
#             stream; CUDA-graph replays against eager steps, a checkpointed and resumed run against a
#             straight one
#
# TRAIN_CASES / SAMPLE_CASES replace the cases, e.g. TRAIN_CASES="16:64 24:32" SAMPLE_CASES="16:64";
# SAMPLE_FLAGS adds options to our sampling run in versus (e.g. --check-tokens, --profile).
# Each program runs under `timeout ${T:-600}`; a failed case prints an error line and the rest go on.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT_LINES=$(mktemp)
run() { echo "## $*" >&2; timeout "${T:-600}" python3 "$@" | tee -a "$OUT_LINES"; }
cases() { local flag=$1; shift; for c in $*; do printf -- '%s %s ' "$flag" "$c"; done; }
official_root() {
  [ -n "${OFFICIAL_ROOT:-}" ] || { echo "OFFICIAL_ROOT must name a FoundationVision/VAR checkout" >&2; exit 2; }
  echo "$OFFICIAL_ROOT"
}
for suite in "$@"; do
  case $suite in
    train)    run benchmarks/train_step.py $(cases --case "${TRAIN_CASES:-16:64 20:64 24:32 30:32:10}") ;;
    sample)   run benchmarks/sample.py $(cases --case "${SAMPLE_CASES:-16:64 16:1 20:64 24:64 24:1}") --check-tokens ;;
    official) root=$(official_root)
              run benchmarks/official_step.py --official-root "$root" $(cases --case "${TRAIN_CASES:-16:64 20:64 24:32}") \
                  $(cases --sample-case "${SAMPLE_CASES:-16:64 20:64 24:64}") ;;
    versus)   root=$(official_root)
              run benchmarks/official_step.py --official-root "$root" $(cases --case "${TRAIN_CASES:-16:64 24:32}") \
                  $(cases --sample-case "${SAMPLE_CASES:-16:64 24:64}") --clocks
              run benchmarks/train_step.py $(cases --case "${TRAIN_CASES:-16:64 24:32}") --clocks
              run benchmarks/sample.py $(cases --case "${SAMPLE_CASES:-16:64 24:64}") --clocks ${SAMPLE_FLAGS:-}
              python3 benchmarks/ratios.py < "$OUT_LINES" ;;
    depths)   for d in ${DEPTHS:-16 20 24 30}; do
                b=$([ "$d" -le 20 ] && echo 64 || echo 32)
                TRAIN_CASES="$d:$b" SAMPLE_CASES="$d:64" bash "$0" versus
              done ;;
    latency)  run benchmarks/sample.py --case 16:1 --case 30:1 ;;
    energy)   run benchmarks/energy_parts.py $(cases --case "${TRAIN_CASES:-20:64 24:32}")
              run benchmarks/train_step.py $(cases --case "${TRAIN_CASES:-20:64 24:32}") --clocks --iters 20 ;;
    switch)   run benchmarks/batch_switch.py --depth 16 --batches 64,1 ;;
    numerics) run benchmarks/train_step.py --numerics --graph-check --resume-check
              run benchmarks/train_step.py --numerics --norm-impl plain --no-compile
              run benchmarks/train_step.py --numerics --residual-dtype float32 ;;
    *) echo "unknown suite $suite (train, sample, official, versus, depths, latency, energy, switch," \
            "numerics)" >&2; exit 2 ;;
  esac
done
rm -f "$OUT_LINES"
