"""Repack a Ray wheel for an offline GPU node that can take only a small upload.

What Ray Train on one node needs is the core (``_raylet.so``, ``gcs_server``, ``raylet``) and the
Python packages; the Java jar (``ray/jars``, 32 MB of the 79 MB wheel), RLlib, Serve, the LLM
package and the dashboard's web build are never loaded by ``TorchTrainer``. The rest is stored
with LZMA instead of deflate (pip reads both). Usage (docs/gpu.md)::

    python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \\
        --platform manylinux2014_x86_64 -d wheels ray==2.60.0
    python tools/slim_ray_wheel.py wheels/ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl \\
        .gpu/whl/ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl
"""

from __future__ import annotations

import argparse
import logging
import os
import zipfile

DROP = ("ray/jars/", "ray/rllib/", "ray/serve/", "ray/llm/", "ray/dashboard/client/build/")
log = logging.getLogger("slim_ray_wheel")


def slim(src: str, dst: str, drop: tuple[str, ...] = DROP) -> tuple[int, int]:
    """Copy ``src`` to ``dst`` without the members under ``drop``, LZMA-compressed; the RECORD lists
    only what is kept. Returns (members kept, members dropped)."""
    kept = dropped = 0
    tmp = dst + ".tmp"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_LZMA) as zout:
        for info in zin.infolist():
            if info.filename.startswith(drop):
                dropped += 1
                continue
            data = zin.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines()
                data = ("\n".join(ln for ln in lines if not ln.startswith(drop)) + "\n").encode()
            out = zipfile.ZipInfo(info.filename, info.date_time)
            out.external_attr, out.compress_type = info.external_attr, zipfile.ZIP_LZMA
            zout.writestr(out, data)
            kept += 1
    os.replace(tmp, dst)
    return kept, dropped


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    args = ap.parse_args()
    kept, dropped = slim(args.src, args.dst)
    log.info("%s: %d members kept, %d dropped, %.1f MB", args.dst, kept, dropped, os.path.getsize(args.dst) / 1e6)


if __name__ == "__main__":
    main()
