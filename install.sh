#!/usr/bin/env bash
# Install varscale into .venv (CPU machine; torch/torchvision pinned in pyproject.toml).
#   bash install.sh          python packages only (enough for the tests)
#   bash install.sh --data   also the default data set (Debian package dataset-fashion-mnist)
set -euo pipefail
cd "$(dirname "$0")"
if [[ "${1:-}" == "--data" && ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]]; then
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get install -y -q dataset-fashion-mnist || { $SUDO apt-get update -q && $SUDO apt-get install -y -q dataset-fashion-mnist; }
fi
[[ -x .venv/bin/python ]] || python3 -m venv .venv
.venv/bin/python -m pip install -q -e '.[test]'
.venv/bin/python -m pip check

# `dvc plots show` renders its HTML with vega, vega-lite and vega-embed, which it loads from a CDN:
# blank pages on an offline node. Put the three scripts (the versions DVC asks for, from the npm
# registry) into a local page template instead. Best effort: without the registry, the CDN page stays.
offline_plots() {
  local tmp page=.dvc/plots/offline.html
  tmp=$(mktemp -d)
  {
    printf '<!DOCTYPE html>\n<html>\n<head>\n    {refresh_tag}\n    <title>DVC Plot</title>\n'
    for pkg in vega/-/vega-5.20.2 vega-lite/-/vega-lite-5.2.0 vega-embed/-/vega-embed-6.18.2; do
      curl -sfL --max-time 60 "https://registry.npmjs.org/$pkg.tgz" | tar -xzO -C "$tmp" "package/build/${pkg%%/*}.min.js" \
        > "$tmp/js" || return 1
      printf '    <script type="text/javascript">\n'; cat "$tmp/js"; printf '\n    </script>\n'
    done
    printf '    <style>table { border-spacing: 15px; }</style>\n</head>\n<body>\n    {plot_divs}\n</body>\n</html>\n'
  } > "$tmp/page" && mv "$tmp/page" "$page" && .venv/bin/dvc config --local plots.html_template plots/offline.html
  rm -rf "$tmp"
}
offline_plots || echo "install.sh: could not fetch vega from registry.npmjs.org; dvc plots show will load it from a CDN" >&2
