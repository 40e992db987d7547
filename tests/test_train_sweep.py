"""`python -m pipeline.sweep`: a Tune grid over depths x one param, each trial a TorchTrainer run."""

import json

import pytest

from pipeline.errors import ParamsError
from pipeline.sweep import apply_overrides, parse_grid, run_sweep, trial_name
from tests.synthetic import write_synthetic_artifacts

from .test_train import TINY_VQ, tiny_params

ray = pytest.importorskip("ray")


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


@pytest.mark.slow
def test_sweep_runs_every_depth_and_value(tmp_path, monkeypatch):
    tok, tokens = write_synthetic_artifacts(tmp_path / "art", TINY_VQ, n_train=32, n_val=16, num_classes=2)
    params = tiny_params(steps=3, batch_size=8, num_evals=1, log_every=1, checkpoint_every=10)
    monkeypatch.chdir(tmp_path)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        results = run_sweep(params, [1, 2], {"train.lr": [0.01, 0.02]}, tokenizer=tok, tokens=tokens,
                            out_dir=tmp_path / "sweeps", name="t", max_concurrent=2)
    finally:
        ray.shutdown()
    assert len(results) == 4 and not [r for r in results if r.error]
    for d in (1, 2):
        for lr in (0.01, 0.02):
            trial = tmp_path / "sweeps" / "t" / f"d{d}-lr={lr}"
            m = json.loads((trial / f"train-d{d}.json").read_text())
            record = json.loads((trial / f"run-d{d}.json").read_text())
            assert m["depth"] == d and m["steps"] == 3 and record["lr_peak"] == pytest.approx(lr * 8 / 256)
    assert {r.metrics["step"] for r in results} == {3}
    import mlflow
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'sweeps' / 'mlflow.db'}")   # not in a checkout
    exp = client.get_experiment_by_name("varscale").experiment_id
    parent = client.search_runs([exp], "tags.`varscale.kind` = 'sweep'")
    assert len(parent) == 1
    children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent[0].info.run_id}'")
    assert sorted(c.data.tags["varscale.depth"] for c in children) == ["1", "1", "2", "2"]
