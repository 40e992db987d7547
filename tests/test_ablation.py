"""The ablation pipeline (ablation/): its params differ from the main ones only where the AR baseline
must, its compute matches VAR's, and the compare stage writes the Table-3 rows it measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.evaluation.ablation import EQUAL_TOLERANCE, TIMING_BATCHES, Side, markdown, table, time_sampling
from pipeline.evaluation.config import SamplingParams
from pipeline.files import write_json
from pipeline.params import read_params
from pipeline.stages import compare_orders
from pipeline.tokenizer.checkpoint import save_tokenizer
from pipeline.training.checkpoint import save_var
from pipeline.training.config import load_train_var_config
from tests.conftest import randomize_
from varcore import VQVAE, VQVAEConfig
from varcore.ar import ARConfig, RasterAR
from varcore.flops import var_flops
from varcore.var import VAR, VARConfig

ROOT = Path(__file__).resolve().parents[1]
# the only differences from params.yaml the AR baseline needs (and the header comment)
ALLOWED = {("tokenizer", "model", "patch_nums"), ("tokenizer", "train", "max_steps"),
           ("tokenizer", "train", "disc_start_step"), ("var", "order"), ("train", "depths"), ("train", "steps")}


def _leaves(d, prefix=()):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _leaves(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def test_ablation_params_differ_from_the_main_ones_only_where_the_baseline_must():
    main = dict(_leaves(yaml.safe_load((ROOT / "params.yaml").read_text())))
    abl = dict(_leaves(yaml.safe_load((ROOT / "ablation" / "params.yaml").read_text())))
    assert set(main) == set(abl)
    assert {k for k in main if main[k] != abl[k]} == ALLOWED
    assert abl[("var", "order")] == "raster" and len(abl[("tokenizer", "model", "patch_nums")]) == 1
    assert abl[("tokenizer", "model", "patch_nums")][0] == main[("tokenizer", "model", "patch_nums")][-1]
    assert set(abl[("train", "depths")]) <= set(main[("train", "depths")])


def test_ablation_steps_give_the_training_compute_of_the_main_var():
    """Equal compute: AR steps x AR FLOPs per image = VAR steps x VAR FLOPs per image, to the
    rounding of one step (the batch is the same)."""
    main, abl = read_params(ROOT / "params.yaml"), read_params(ROOT / "ablation" / "params.yaml")
    for depth in abl["train"]["depths"]:
        a = load_train_var_config(abl, "ablation/params.yaml", depth)
        v = load_train_var_config(main, "params.yaml", depth)
        a_cfg, v_cfg = a.var_config(10), v.var_config(10)
        assert isinstance(a_cfg, ARConfig) and type(v_cfg) is VARConfig
        assert a.train.batch_size == v.train.batch_size
        c_ar = a.train.steps * var_flops(a_cfg).train_per_image
        c_var = v.train.steps * var_flops(v_cfg).train_per_image
        assert abs(c_ar / c_var - 1) <= var_flops(a_cfg).train_per_image / c_var + 1e-12   # within one AR step
        assert abs(c_ar / c_var - 1) < EQUAL_TOLERANCE


def _side(name, N, compute, fid, L=4.0):
    return Side(name, {"N": N, "compute": compute, "steps": 10, "L_mean": L},
                {"params_total": N + 5, "images_seen": 320},
                {"fid": fid, "is_mean": 2.0, "precision": 0.5, "recall": 0.4}, {"val_psnr": 20.0})


def _tiny(tmp_path):
    torch.manual_seed(0)
    vq_var = VQVAEConfig(image_size=16, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, Cvae=8, vocab_size=32,
                         patch_nums=(1, 2, 4))
    vq_ar = VQVAEConfig(image_size=16, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, Cvae=8, vocab_size=32,
                        patch_nums=(4,))
    var = randomize_(VAR(VARConfig(depth=1, vocab_size=32, Cvae=8, patch_nums=(1, 2, 4), num_classes=3))).eval()
    ar = randomize_(RasterAR(ARConfig(depth=1, vocab_size=32, Cvae=8, patch_nums=(4,), num_classes=3))).eval()
    return var, VQVAE(vq_var).eval(), ar, VQVAE(vq_ar).eval()


def test_table_ratios_and_flags():
    var, _, ar, _ = _tiny(None)
    timing = {"ar": [{"batch": 1, "ms_per_image": 10.0}, {"batch": 64, "ms_per_image": 2.0}],
              "var": [{"batch": 1, "ms_per_image": 2.0}, {"batch": 64, "ms_per_image": 0.5}]}
    t = table(_side("AR", 100, 1.0e9, 9.0), _side("VAR", 100, 1.01e9, 6.0), ar, var, timing)
    assert t["speedup_var_over_ar"] == {"1": 5.0, "64": 4.0} and t["flags"] == []
    assert t["sides"]["ar"]["sequential_calls"] == 16 and t["sides"]["var"]["sequential_calls"] == 3
    text = markdown(t, "cpu", "test cpu", {"AR": "a.png", "VAR": "v.png"})
    for needle in ("| sequential transformer calls / image | 16 | 3 |", "| FID (lower is better) | 9.00 | 6.00 |",
                   "| time / image at batch 64 (ms) | 2 | 0.5 |", "5.00x at batch 1", "- none", "- AR: ![AR](a.png)"):
        assert needle in text, needle
    uneven = table(_side("AR", 100, 1.5e9, 9.0), _side("VAR", 200, 1.0e9, 6.0), ar, var, timing)
    assert len(uneven["flags"]) == 2 and "training compute differs: AR/VAR = 1.500" in uneven["flags"][0]


def test_sampling_time_is_measured_per_image():
    var, vq, _, _ = _tiny(None)
    t = time_sampling(var, vq, SamplingParams(cfg=1.0, top_k=10, top_p=0.9), 4, 1, torch.device("cpu"))
    assert t["batch"] == 4 and t["ms_per_image"] > 0 and t["ms_per_batch"] == pytest.approx(4 * t["ms_per_image"])


def test_compare_stage_writes_the_rows_it_measured(tmp_path):
    var, vq_var, ar, vq_ar = _tiny(tmp_path)
    save_var(tmp_path / "ar.pt", ar)
    save_var(tmp_path / "var.pt", var)
    save_tokenizer(tmp_path / "tok-ar.pt", vq_ar)
    save_tokenizer(tmp_path / "tok-var.pt", vq_var)
    files = {}
    for key, N, c, fid in (("ar", 7, 2.0e9, 9.5), ("var", 7, 2.0e9, 5.5)):
        s = _side(key, N, c, fid)
        for part, obj in (("train", s.train), ("train_record", s.train_record), ("eval", s.eval),
                          ("tokenizer_metrics", s.tokenizer)):
            files[f"{key}_{part}"] = tmp_path / key / f"{part}.json"
            write_json(files[f"{key}_{part}"], obj)
    paths = compare_orders.Paths(
        tmp_path / "ar.pt", tmp_path / "tok-ar.pt", files["ar_tokenizer_metrics"], files["ar_train"],
        files["ar_train_record"], files["ar_eval"], tmp_path / "ar" / "grid.png",
        tmp_path / "var.pt", tmp_path / "tok-var.pt", files["var_tokenizer_metrics"], files["var_train"],
        files["var_train_record"], files["var_eval"], tmp_path / "var" / "grid.png",
        tmp_path / "out" / "compare.json", tmp_path / "out" / "report.md")
    from pipeline.evaluation.config import EvaluateParams
    m = compare_orders.run(EvaluateParams(sampling=SamplingParams(cfg=1.0, top_k=10, top_p=0.9)), paths)
    saved = json.loads(paths.metrics.read_text())
    assert m["fid_ar"] == 9.5 and m["fid_var"] == 5.5 and m["compute_ratio"] == 1.0 and m["flags"] == 0
    assert [t["batch"] for t in saved["sides"]["ar"]["timing"]] == list(TIMING_BATCHES)
    assert saved["sides"]["ar"]["sequential_calls"] == 16 and saved["device"] == "cpu"
    text = paths.report.read_text()
    assert "](../ar/grid.png)" in text and "](../var/grid.png)" in text   # relative to the report
