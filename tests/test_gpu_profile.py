"""The GPU profile and the tools that run it on an offline node (docs/gpu.md).

The profile must reuse the default run's upstream artifacts as they are (the node gets the default
tokens, tokenizer and classifier), so its sections up to the transformer equal params.yaml's; the
slimmed Ray wheel must hold everything but the dropped folders, with a RECORD that lists what is there.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import yaml

from pipeline.params import read_params
from pipeline.training.config import load_train_var_config
from tools.slim_ray_wheel import DROP, slim

ROOT = Path(__file__).resolve().parents[1]
# what the GPU profile may change: the transformer sweep, its resources, and the zero-shot depth
# (which must be one of the trained depths)
GPU_ONLY = ("train.", "zeroshot.depth")


def _leaves(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict) and v:
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def test_gpu_profile_shares_every_upstream_section_with_the_default():
    main = dict(_leaves(yaml.safe_load((ROOT / "params.yaml").read_text())))
    gpu = dict(_leaves(yaml.safe_load((ROOT / "profiles" / "gpu.yaml").read_text())))
    upstream = {k for k in set(main) | set(gpu) if not k.startswith(GPU_ONLY)}
    assert upstream and {k: main.get(k) for k in upstream} == {k: gpu.get(k) for k in upstream}
    assert main["train.depths"] != gpu["train.depths"] and gpu["zeroshot.depth"] in gpu["train.depths"]


def test_gpu_profile_trains_every_depth_for_the_same_epochs_on_a_gpu_share():
    params = read_params(ROOT / "profiles" / "gpu.yaml")
    depths = params["train"]["depths"]
    assert len(depths) >= 5 and min(depths) >= 6
    for d in depths:
        cfg = load_train_var_config(params, "profiles/gpu.yaml", d)
        assert cfg.train.epochs == 3 and cfg.train.steps is None and cfg.train.ray.use_gpu
        assert 0 < cfg.train.ray.resources_per_worker["GPU"] <= 1
        assert cfg.train.total_steps(63_000) == 3 * (63_000 // 256) == 738   # the same images for every depth


def test_slim_ray_wheel_drops_the_unused_folders_and_keeps_the_rest(tmp_path):
    src, dst = tmp_path / "ray-9.9-cp312-cp312-linux_x86_64.whl", tmp_path / "out.whl"
    kept = {"ray/__init__.py": b"x = 1\n", "ray/_raylet.so": bytes(range(256)) * 40, "ray/train/torch.py": b"t\n"}
    dropped = {f"{d}file.bin": b"j" * 1000 for d in DROP}
    record = "".join(f"{n},sha256=abc,1\n" for n in [*kept, *dropped]) + "ray-9.9.dist-info/RECORD,,\n"
    with zipfile.ZipFile(src, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in {**kept, **dropped}.items():
            z.writestr(name, data)
        z.writestr("ray-9.9.dist-info/RECORD", record)
    assert slim(str(src), str(dst)) == (len(kept) + 1, len(dropped))
    with zipfile.ZipFile(dst) as z:
        assert {n: z.read(n) for n in kept} == kept
        assert not any(n.startswith(DROP) for n in z.namelist())
        assert all(i.compress_type == zipfile.ZIP_LZMA for i in z.infolist())
        listed = [line.split(",")[0] for line in z.read("ray-9.9.dist-info/RECORD").decode().splitlines()]
    assert listed == [*kept, "ray-9.9.dist-info/RECORD"]
