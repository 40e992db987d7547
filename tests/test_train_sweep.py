"""`python -m pipeline.sweep`: a Tune grid over depths x one param, each trial a TorchTrainer run (the
grid and the store here; a whole sweep through `ray job submit` in tests/test_ray_cli.py)."""

import pytest

from pipeline.errors import ParamsError
from pipeline.sweep import apply_overrides, parse_grid, trial_name


def test_sweeps_log_to_the_store_of_the_checkout_that_made_the_tokens(tmp_path):
    from pipeline.sweep import default_mlflow_uri
    repo = tmp_path / "repo"
    (repo / ".dvc").mkdir(parents=True)
    (repo / "dvc.yaml").write_text("stages: {}\n")
    (repo / "data" / "tokens").mkdir(parents=True)
    assert default_mlflow_uri(repo / "data" / "tokens", tmp_path / "sweeps") == f"sqlite:///{repo / 'mlflow.db'}"
    assert default_mlflow_uri(tmp_path / "elsewhere", tmp_path / "sweeps") == f"sqlite:///{tmp_path / 'sweeps' / 'mlflow.db'}"


def test_grid_and_overrides():
    grid = parse_grid(["train.lr=1e-4,2e-4", "var.model.shared_aln=true,false"])
    assert grid == {"train.lr": [1e-4, 2e-4], "var.model.shared_aln": [True, False]}
    p = apply_overrides({"train": {"lr": 1.0}}, {"train.lr": 2.0, "train.ray.num_workers": 4})
    assert p == {"train": {"lr": 2.0, "ray": {"num_workers": 4}}}
    assert trial_name({"depth": 3, "overrides": {"train.lr": 0.1}}) == "d3-lr=0.1"
    with pytest.raises(ParamsError, match="expected section.key=v1,v2"):
        parse_grid(["train.lr"])
