#!/usr/bin/env bash
# Pack what an offline GPU node needs into .gpu/ (git-ignored; under 64 MiB): the slimmed Ray wheel
# and the wheels of Ray Train's dependencies the node lacks, the default run's token shards, the val
# split (evaluate's reference), the tokenizer and the classifier. docs/gpu.md explains each part.
#   tools/pack_gpu.sh [WHEEL_DIR]     (WHEEL_DIR: where `pip download` put the wheels, default .whl)
set -euo pipefail
cd "$(dirname "$0")/.."
wheels=${1:-.whl}
rm -rf .gpu.tmp && mkdir -p .gpu.tmp/whl .gpu.tmp/models
for w in "$wheels"/*.whl; do
  case "$(basename "$w")" in
    ray-*) python tools/slim_ray_wheel.py "$w" ".gpu.tmp/whl/$(basename "$w")" ;;
    *) cp "$w" .gpu.tmp/whl/ ;;
  esac
done
tar -cf - data/tokens | xz -6 -T0 > .gpu.tmp/tokens.tar.xz
tar -cf - data/images/manifest.json data/images/val.npy data/images/val-labels.npy | xz -6 -T0 > .gpu.tmp/val.tar.xz
cp models/tokenizer.pt models/classifier.pt .gpu.tmp/models/
(cd .gpu.tmp && sha256sum tokens.tar.xz val.tar.xz models/* > SHA256SUMS)
rm -rf .gpu && mv .gpu.tmp .gpu
du -ch .gpu | tail -1
