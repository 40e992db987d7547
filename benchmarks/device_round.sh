#!/usr/bin/env bash
# One round of measurements on the device machine (see RESULTS.md for how it was called).
# Usage: bash benchmarks/device_round.sh STAGE...   Output: JSON lines in $OUT/results.jsonl.
# Inductor/Triton caches travel between calls as .devcache/ind.tgz (git-ignored, carried).
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/ind TRITON_CACHE_DIR=/tmp/ind/triton
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
[ -f .devcache/ind.tgz ] && tar xzf .devcache/ind.tgz -C /tmp
R="$OUT/results.jsonl"
run() { echo "## $*" >&2; timeout "${T:-400}" python3 "$@" 2>>"$OUT/stderr.log" | tee -a "$R"; }
for stage in "$@"; do
  case $stage in
    env) nvidia-smi -L; python3 -c 'import torch,triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())' ;;
    train16) run benchmarks/train_step.py --case 16:64 --plain --warmup 2 --iters 5
             run benchmarks/train_step.py --case 16:64
             run benchmarks/train_step.py --case 16:64 --attn-impl per_scale ;;
    sample16) run benchmarks/sample.py --case 16:64 --case 16:1 --check-tokens
              run benchmarks/sample.py --case 16:64 --case 16:1 --engine plain --iters 5
              run benchmarks/sample.py --case 16:64 --channels-last --iters 5 ;;
    numerics) run benchmarks/train_step.py --numerics ;;
    train_big) run benchmarks/train_step.py --case 30:32:30 --iters 5
               run benchmarks/train_step.py --case 24:32 --case 20:64 ;;
    sample_big) run benchmarks/sample.py --case 20:64 --case 24:64 --case 20:1 --case 24:1 ;;
    *) python3 "$@"; break ;;
  esac
done
tar czf "$OUT/ind.tgz" -C /tmp ind 2>/dev/null; ls -la "$OUT"
