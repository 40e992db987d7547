"""The report stage renders from a fixture metrics set, the same bytes on every rerun."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pipeline.evaluation.config import FitParams
from pipeline.files import write_json
from pipeline.images import save_png
from pipeline.stages import fit, report

from .test_fit import write_runs

REFERENCE = {"real_vs_real": {"fid": 0.5, "is_mean": 9.1, "kid_mean": 0.0001, "precision": 0.7, "recall": 0.7,
                              "images": 2000},
             "tokenizer": {"fid": 3.2, "is_mean": 8.5, "kid_mean": 0.002, "precision": 0.6, "recall": 0.6,
                           "images": 7000}}
EVAL_EXTRA = {"sampling": {"cfg": 1.5, "top_k": 900, "top_p": 0.96, "engine": "auto"}, "seeds": [0, 1],
              "samples_per_seed": 2000, "reference_images": 7000, "class_names": [str(i) for i in range(10)],
              "feature_network": {"name": "classifier", "weights": "classifier.pt", "sha256": "ab" * 32,
                                  "val_accuracy": 0.91}, "tokenizer_sha256": "cd" * 32}


ZEROSHOT = {"depth": 4, "images": 1000, "reference_images": 6000, "hole_fraction": 0.4167, "lpips": False,
            "holes": [[0.25, 0.25, 0.75, 0.75], [0.5, 0.0, 1.0, 1.0]], "rows": ["original", "masked", "VAR in-painted"],
            "methods": {m: {"mse_hole": mse, "fid": fid, "kid_mean": 0.001, "precision": 0.7, "recall": 0.6}
                        for m, mse, fid in (("var_inpaint", 0.031, 2.5), ("uncond_fill", 0.09, 9.0),
                                            ("class_fill", 0.07, 6.0), ("original", 0.0, 0.4))}}


def fixture(tmp_path, depths=(1, 2, 3, 4)):
    files = write_runs(tmp_path, depths)
    for d in depths:
        record = {**json.loads((files.eval_records / f"d{d}.json").read_text()), **EVAL_EXTRA}
        write_json(files.eval_records / f"d{d}.json", record)
        save_png(files.eval / f"samples-d{d}.png", np.full((20, 30, 3), 40 * d, np.uint8))
    write_json(tmp_path / "reference.json", {**REFERENCE, "feature_network": EVAL_EXTRA["feature_network"]})
    write_json(tmp_path / "zeroshot.json", ZEROSHOT)
    save_png(tmp_path / "zeroshot.png", np.full((7 * 8, 8 * 8, 3), 90, np.uint8))
    write_json(tmp_path / "images" / "manifest.json", {"source": "fashion_mnist", "image_size": 32,
                                                       "classes": [str(i) for i in range(10)],
                                                       "splits": {"train": {"count": 63000}, "val": {"count": 7000}}})
    fit.run(fit.FitConfig(tuple(depths), 0.05, FitParams()),
            fit.Paths(files.train, files.train_records, files.eval, files.eval_records, tmp_path / "scaling.json",
                      tmp_path / "fit.json"))
    return report.Paths(files.train, files.train_records, files.eval, files.eval_records, tmp_path / "fit.json",
                        tmp_path / "reference.json", tmp_path / "images", tmp_path / "reports",
                        zeroshot=tmp_path / "zeroshot.json", zeroshot_grid=tmp_path / "zeroshot.png")


def test_report_renders_tables_fits_figures_and_provenance(tmp_path):
    paths = fixture(tmp_path)
    out = report.run(report.ReportConfig((1, 2, 3, 4), "params.yaml"), paths)
    assert out == {"depths": 4, "flags": out["flags"], "fit_status": "ok"}
    text = (paths.out / "scaling.md").read_text()
    for needle in ("## Runs", "| depth | N | tokens |", "## Fitted power laws", "| L_mean vs N | 4 | -0.1000 |",
                   "FID vs N", "paper alpha", "| -0.2 |", "real train images vs val (floor)",
                   "tokenizer round trip of val (rFID)", "CFG 1.5, top-k 900, top-p 0.96",
                   "val accuracy 91.0%", "## Provenance", "git commit", "torch-fidelity",
                   "figures/scaling_vs_N.png", "figures/samples-d4.png", "## Zero-shot in-painting",
                   "| VAR in-painting (zero-shot) | 0.03100 | 2.500 |", "| original, no hole (floor) | 0.00000 | 0.400 |",
                   "LPIPS is off", "figures/zeroshot.png", "[ablation.md](ablation.md)"):
        assert needle in text, needle
    frame = pd.read_csv(paths.out / "runs.csv")
    assert list(frame["depth"]) == [1, 2, 3, 4] and frame["L_mean"].is_monotonic_decreasing
    for name in ("scaling_vs_N", "scaling_vs_C", "fidelity_vs_N"):
        assert (paths.out / "figures" / f"{name}.png").stat().st_size > 10_000
    for d in (1, 2, 3, 4):
        assert (paths.out / "figures" / f"samples-d{d}.png").read_bytes() == (paths.eval / f"samples-d{d}.png").read_bytes()
    first = {p.name: p.read_bytes() for p in sorted(paths.out.rglob("*")) if p.is_file()}
    report.run(report.ReportConfig((1, 2, 3, 4), "params.yaml"), paths)      # nothing changed: same bytes
    assert {p.name: p.read_bytes() for p in sorted(paths.out.rglob("*")) if p.is_file()} == first


def test_report_lists_the_runs_when_the_fit_refuses(tmp_path):
    paths = fixture(tmp_path, depths=(1, 2))
    out = report.run(report.ReportConfig((1, 2), "params.yaml"), paths)
    text = (paths.out / "scaling.md").read_text()
    assert out["fit_status"] == "refused"
    assert "**The fit refused:** 2 depth(s) [1, 2]: a fit needs at least 3" in text
    assert "| 2 | 590k | 100k |" in text


@pytest.mark.parametrize("missing", ["fit.json", "reference.json", "zeroshot.json"])
def test_report_names_a_missing_input(tmp_path, missing):
    from pipeline.errors import InputError
    paths = fixture(tmp_path)
    (tmp_path / missing).unlink()
    with pytest.raises((InputError, FileNotFoundError), match=missing):
        report.run(report.ReportConfig((1, 2, 3, 4), "params.yaml"), paths)


def test_gpu_report_compares_profiles_lists_throughput_and_leaves_zeroshot_out(tmp_path):
    """The GPU profile's report (gpu/dvc.yaml): no in-painting, another profile's exponents beside
    the fitted ones, the notes under the title, each depth's tokens/s from its run record."""
    import dataclasses
    paths = fixture(tmp_path)
    other = json.loads((tmp_path / "fit.json").read_text())
    other["fits"]["L_mean_vs_N"].update(alpha=-0.0248, r=-0.998)
    write_json(tmp_path / "cpu-fit.json", other)
    (tmp_path / "notes.md").write_text("**What this run is.** Four depths on one GPU.\n")
    for d, rate in ((1, 1_257_002.4), (3, 488_204.0)):   # depths 2 and 4 ran before the figure was recorded
        rec = paths.train_records / f"d{d}.json"
        write_json(rec, {**json.loads(rec.read_text()), "tokens_per_s": rate, "train_seconds": 150.2,
                         "wall_seconds": 194.2, "machine": {"cpu": "x", "isa": "avx2", "accelerator": "NVIDIA H200 x1"}})
    gpu = dataclasses.replace(paths, zeroshot=None, zeroshot_grid=None, compare=tmp_path / "cpu-fit.json",
                              notes=tmp_path / "notes.md", out=tmp_path / "gpu")
    report.run(report.ReportConfig((1, 2, 3, 4), "profiles/gpu.yaml"), gpu)
    text = (gpu.out / "scaling.md").read_text()
    assert text.startswith("# VAR scaling laws (profiles/gpu.yaml)\n")
    assert "**What this run is.** Four depths on one GPU." in text
    assert "Zero-shot" not in text and not (gpu.out / "figures" / "zeroshot.png").exists()
    assert f"Compared: the fits of `{tmp_path / 'cpu-fit.json'}`." in text
    assert "| paper alpha | paper r | compared alpha | compared r | flags |" in text
    row = next(line for line in text.splitlines() if line.startswith("| L_mean vs N |"))
    assert row.split(" | ")[-3:-1] == ["-0.0248", "-0.998"]
    assert "## Training throughput" in text
    assert "| 1 | 1,257,002 | 150.2 | 194.2 | NVIDIA H200 x1 |" in text and "| 3 | 488,204 |" in text
    assert "| 2 | " not in text.split("## Training throughput")[1].split("## Provenance")[0]


def test_zeroshot_without_its_picture_is_named(tmp_path):
    import dataclasses

    from pipeline.errors import InputError
    paths = dataclasses.replace(fixture(tmp_path), zeroshot_grid=None)
    with pytest.raises(InputError, match="--zeroshot needs --zeroshot-grid"):
        report.run(report.ReportConfig((1, 2, 3, 4), "params.yaml"), paths)


def test_stage_options_with_a_default_are_optional():
    from pathlib import Path

    from pipeline.stage import parse_paths
    base = ["--params", "p.yaml", "--train", "t", "--train-records", "tr", "--eval", "e", "--eval-records", "er",
            "--fit", "f.json", "--reference", "r.json", "--images", "i", "--out", "o"]
    _, plain = parse_paths(report.Paths, base, "report")
    assert plain.compare is None and plain.zeroshot is None and plain.out == Path("o")
    _, given = parse_paths(report.Paths, base + ["--compare", "runs/fit.json"], "report")
    assert given.compare == Path("runs/fit.json")
    with pytest.raises(SystemExit):     # a field without a default stays required
        parse_paths(report.Paths, base[:-2], "report")
