"""The train_var stage without Ray: params, compute accounting, validation metrics, schedules, I/O."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from pipeline.errors import ArtifactError, ParamsError
from pipeline.params import load, read_params
from pipeline.training.checkpoint import load_var, save_var
from pipeline.training.config import TrainParams, VarParams, load_train_var_config
from pipeline.training.driver import TrainPaths, load_inputs, summarize_run
from pipeline.training.metrics import TokenStats, summarize, token_stats, train_compute
from pipeline.training.schedule import eval_steps, global_batch_indices, lr_at, rank_slice, step_seed
from pipeline.training.worker import evaluate
from tests.synthetic import write_synthetic_artifacts
from varcore import VAR, VARConfig, VQVAEConfig
from varcore.flops import count_main_params, count_params, main_N, paper_N, var_flops
from varcore.scales import ScaleLayout

TINY_VQ = VQVAEConfig(image_size=16, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, mid_attn=False, Cvae=8,
                      vocab_size=64, patch_nums=(1, 2, 3, 4))


def tiny_params(**train):
    return {"tokenizer": {"model": {"image_size": 16, "ch": 16, "ch_mult": [1, 2, 2], "mid_attn": False, "Cvae": 8,
                                    "vocab_size": 64, "patch_nums": [1, 2, 3, 4]}},
            "var": {"model": {}}, "train": {"depths": [1], "batch_size": 16, "steps": 4, **train}, "execution": {}}


def train_params(section: dict) -> TrainParams:
    return load(TrainParams, section, "train", "params.yaml")


# ---- params ----------------------------------------------------------------------------------
@pytest.mark.parametrize("file", ["params.yaml", "profiles/paper.yaml"])
def test_repo_params_load(file):
    cfg = load_train_var_config(read_params(file), file, 2)
    tp = cfg.train
    assert len(tp.depths) >= 4 and tp.peak_lr == pytest.approx(tp.lr * tp.batch_size / 256)
    assert cfg.var_config(10).L == ScaleLayout(cfg.tokenizer.patch_nums).L


@pytest.mark.parametrize("section, message", [
    ({"train": {"steps": 10, "batch_size": 0}}, "params.yaml:train.batch_size: must be >= 1"),
    ({"train": {"steps": 10, "ray": {"num_workers": 0}}}, "params.yaml:train.ray.num_workers"),
    ({"train": {"steps": 10, "batch_size": 7, "ray": {"num_workers": 2}}}, "train.batch_size: 7 is not divisible"),
    ({"train": {"steps": 10, "epochs": 2}}, "train.steps: set exactly one of steps and epochs"),
    ({"train": {"steps": 10, "decay": "step"}}, "train.decay"),
    ({"train": {"steps": 10, "ray": {"gpus": 1}}}, "train.ray: unknown key(s) ['gpus']"),
    ({"train": {"steps": 10, "depths": [2, 2]}}, "train.depths: has duplicates"),
    ({"train": {"steps": 10, "precision": "fp16"}}, "train.precision: must be one of ['auto', 'bf16', 'fp32']"),
    ({"train": {"steps": 10, "cuda_graph": True}}, "train: unknown key(s) ['cuda_graph']"),   # now in execution
])
def test_bad_train_params_name_the_key(section, message):
    with pytest.raises(ParamsError, match=None) as e:
        train_params(section)
    assert message in str(e.value)


@pytest.mark.parametrize("change, message", [
    (lambda p: p.pop("execution"), "params.yaml:execution: section missing"),
    (lambda p: p.pop("train"), "params.yaml:train: section missing"),
    (lambda p: p["tokenizer"].pop("model"), "params.yaml:tokenizer.model: section missing"),
    (lambda p: p["execution"].update(attention="flash"), "params.yaml:execution.attention: must be one of"),
    (lambda p: p["execution"].update(cuda_graph="yes"), "params.yaml:execution.cuda_graph: must be one of"),
    (lambda p: p["var"]["model"].update(width=100, num_heads=3), "params.yaml:var.model.width: width 100"),
])
def test_train_var_config_is_checked_whole_at_the_entry(change, message):
    params = tiny_params()
    change(params)
    with pytest.raises(ParamsError) as e:
        load_train_var_config(params, "params.yaml", 2)
    assert message in str(e.value)


def test_execution_plan_is_not_part_of_the_run_identity():
    a = load_train_var_config(tiny_params(), "params.yaml", 2)
    p = tiny_params()
    p["execution"] = {"attention": "per_scale", "compile": False, "checkpointing": 1}
    p["train"]["depths"] = [1, 2, 3]
    b = load_train_var_config(p, "params.yaml", 2)
    assert a.execution != b.execution and a.recipe() == b.recipe()
    p["train"]["lr"] = 0.5
    assert load_train_var_config(p, "params.yaml", 2).recipe() != a.recipe()


def test_var_model_cannot_override_depth_or_tokenizer_fields():
    with pytest.raises(ParamsError, match=r"params.yaml:var.model: \['depth'\] are set by train.depths"):
        load(VarParams, {"var": {"model": {"depth": 3}}}, "var", "params.yaml")


def test_epochs_give_steps():
    tp = train_params({"train": {"steps": None, "epochs": 2.5, "batch_size": 10}})
    assert tp.total_steps(105) == 25
    with pytest.raises(ParamsError, match="batch_size 10 exceeds"):
        tp.total_steps(5)


# ---- compute accounting ----------------------------------------------------------------------
def test_flops_match_hand_count_and_measured_matmuls():
    # d=1, w=8, hidden 32, L = 1 + 4 = 5 tokens, V = 10, Cvae = 4
    cfg = VARConfig(depth=1, width=8, num_heads=2, vocab_size=10, Cvae=4, patch_nums=(1, 2), num_classes=3)
    f = var_flops(cfg)
    linear = 2 * 5 * 1 * (4 * 8 * 8 + 2 * 32 * 8)            # qkv + proj + fc1 + fc2, per token
    attention = 2 * 2 * 8 * (1 * 1 + 4 * 5) * 1              # QK^T and AV over the 21 allowed pairs
    adaln = 2 * (6 * 8 * 8 * 1 + 2 * 8 * 8)                  # block + head AdaLN, once per image
    embed_head = 2 * (4 * 4 * 8 + 5 * 8 * 10)                # word embedding of 4 tokens + head of 5
    forward = linear + attention + adaln + embed_head
    assert (f.linear, f.attention, f.adaln, f.embed_head) == (7680, 672, 1024, 1056)
    assert f.forward == forward == 10432
    assert f.train_per_token == pytest.approx(3 * forward / 5)
    # tokens = steps * batch * L; C = train_per_token * tokens
    assert train_compute(cfg, 10 * 4 * 5) == pytest.approx(3 * forward * 10 * 4)
    # every matmul the model really runs (FlopCounterMode counts addmm; CPU SDPA is not counted)
    model = VAR(cfg).eval()
    with FlopCounterMode(display=False) as fc:
        model(torch.tensor([1]), torch.randn(1, cfg.L - 1, cfg.Cvae))
    assert fc.get_total_flops() == forward - attention


@pytest.mark.parametrize("cfg", [
    VARConfig(depth=2, vocab_size=16, Cvae=4, patch_nums=(1, 2), num_classes=3),
    VARConfig(depth=3, vocab_size=16, Cvae=4, patch_nums=(1, 2), num_classes=3, shared_aln=True),
    VARConfig(depth=2, width=48, num_heads=3, vocab_size=16, Cvae=4, patch_nums=(1, 2), num_classes=3),
])
def test_N_matches_the_models_parameters(cfg):
    model = VAR(cfg)
    assert main_N(cfg) == count_main_params(model)
    if cfg.width is None and not cfg.shared_aln:
        assert main_N(cfg) == paper_N(cfg.depth) == 73728 * cfg.depth ** 3
    assert count_params(model) > main_N(cfg)   # embeddings, head, biases on top


def test_summarize_run_records_N_tokens_and_compute():
    cfg = VARConfig(depth=2, vocab_size=16, Cvae=4, patch_nums=(1, 2, 3), num_classes=3)
    config = load_train_var_config(dict(tiny_params(steps=6, batch_size=8)), "params.yaml", 2)
    model = VAR(cfg)
    row = {"step": 6, "tokens": 6 * 8 * 14, "compute": 0.0, "L_last": 2.0, "L_mean": 1.5, "Err_last": 0.5,
           "Err_mean": 0.25}
    payload = {"model": model.state_dict(), "state": {"step": 6, "curve": [row],
                                                      "train_curve": [{"step": 6, "train_loss": 1.25}]}}

    class Inputs:
        pass
    inputs = Inputs()
    inputs.cfg = cfg
    m, counts, m_model = summarize_run(config, inputs, payload)
    assert m["N"] == 73728 * 8 == counts["N_counted_main"]
    assert counts["params_total"] == count_params(model)
    assert m["tokens"] == 6 * 8 * 14 and counts["images_seen"] == 48 and m["steps"] == 6
    assert m["compute"] == pytest.approx(var_flops(cfg).train_per_token * 6 * 8 * 14)
    assert counts["compute_6NT"] == 6 * m["N"] * m["tokens"]
    assert (m["L_mean"], m["L_last"], m["Err_mean"], m["Err_last"], m["train_loss"]) == (1.5, 2.0, 0.25, 0.5, 1.25)
    assert "curve" not in m and "train_curve" not in m          # the curves are files of their own
    assert torch.equal(m_model.pos_1LC, model.pos_1LC)


# ---- validation metrics ------------------------------------------------------------------------
class FixedTokenModel(nn.Module):
    """Predicts token 0 with logit ln 3 and every other token with logit 0: p(0) = 3 / (3 + V - 1)."""

    def __init__(self, cfg: VARConfig):
        super().__init__()
        self.cfg = cfg
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, label_B, x_BlCvae):
        logits = torch.zeros(len(label_B), self.cfg.L, self.cfg.vocab_size)
        logits[..., 0] = math.log(3.0)
        return logits


def test_token_stats_exact_for_a_fixed_prediction():
    # V = 4: p(0) = 3/6 = 1/2, p(other) = 1/6. Scales (1, 2): targets [0 | 0, 1, 2, 0]
    cfg = VARConfig(depth=1, vocab_size=4, Cvae=2, patch_nums=(1, 2), num_classes=2)
    tokens = torch.tensor([[0, 0, 1, 2, 0]])
    s = summarize(token_stats(FixedTokenModel(cfg)(torch.tensor([0]), None), tokens, cfg.layout.scale_ids(), 2))
    assert s["L_last"] == pytest.approx((2 * math.log(2) + 2 * math.log(6)) / 4, abs=1e-6)
    assert s["Err_last"] == 0.5
    assert s["L_mean"] == pytest.approx((3 * math.log(2) + 2 * math.log(6)) / 5, abs=1e-6)
    assert s["Err_mean"] == pytest.approx(2 / 5)
    assert s["L_per_scale"][0] == pytest.approx(math.log(2)) and s["Err_per_scale"] == [0.0, 0.5]


def test_evaluate_exact_and_independent_of_the_rank_split(tiny_vqvae):
    cfg = VARConfig(depth=1, vocab_size=64, Cvae=8, patch_nums=(1, 2, 3, 4), num_classes=5)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 64, (10, cfg.L)).astype(np.uint16)
    tokens[:, -16:] = 0                      # last scale always token 0: Err_last = 0, L_last = ln((3+63)/3)
    labels = rng.integers(0, 5, 10)
    q, model = tiny_vqvae.quantizer, FixedTokenModel(cfg)
    whole = evaluate(model, q, tokens, labels, cfg, 3, 0, 1, torch.device("cpu"))
    assert whole["Err_last"] == 0.0
    assert whole["L_last"] == pytest.approx(math.log(66 / 3), abs=1e-6)
    n0 = int((tokens == 0).sum())
    expected_mean = (n0 * math.log(22) + (tokens.size - n0) * math.log(66)) / tokens.size
    assert whole["L_mean"] == pytest.approx(expected_mean, abs=1e-6)
    assert whole["Err_mean"] == pytest.approx(1 - n0 / tokens.size)
    # two "ranks" each take half; their summed stats equal the whole (all_reduce is a sum)
    parts = [token_stats(model(torch.from_numpy(labels[i:i + 5]), None), torch.from_numpy(tokens[i:i + 5].astype(np.int64)),
                         cfg.layout.scale_ids(), 4) for i in (0, 5)]
    split = summarize(parts[0] + parts[1])
    for k in ("L_last", "L_mean", "Err_last", "Err_mean"):
        assert split[k] == pytest.approx(whole[k], abs=1e-9)
    assert isinstance(parts[0], TokenStats)


# ---- schedules and batches -------------------------------------------------------------------
def test_eval_steps_double_the_compute_and_end_at_the_last_step():
    assert eval_steps(200, 4) == [25, 50, 100, 200]
    assert eval_steps(3, 5) == [1, 2, 3]
    assert eval_steps(200, 4, "linear") == [50, 100, 150, 200]


def test_lr_warmup_then_linear_and_cosine_decay():
    kw = dict(total_steps=100, peak=1.0, warmup_frac=0.1, min_frac=0.01)
    assert lr_at(0, decay="linear", **kw) == pytest.approx(0.1)
    assert lr_at(9, decay="linear", **kw) == pytest.approx(1.0)
    assert lr_at(10, decay="linear", **kw) == pytest.approx(1.0)
    assert lr_at(99, decay="linear", **kw) == pytest.approx(0.01)
    assert lr_at(99, decay="cosine", **kw) == pytest.approx(0.01)
    mid = 10 + 89 / 2
    assert lr_at(int(mid), decay="cosine", **kw) == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 0.494)),
                                                                   abs=1e-3)


def test_rank_slices_partition_the_global_batch_and_epochs_cover_the_data():
    seen = []
    for step in range(5):                     # 5 steps of 8 over 40 rows = one epoch
        g = global_batch_indices(40, 8, seed=3, step=step)
        parts = [rank_slice(g, r, 4) for r in range(4)]
        assert np.array_equal(np.concatenate(parts), g)
        seen.extend(g.tolist())
    assert sorted(seen) == list(range(40))
    assert not np.array_equal(global_batch_indices(40, 8, 3, 0), global_batch_indices(40, 8, 3, 5))
    assert step_seed(0, 1, 0) != step_seed(0, 1, 1) and step_seed(0, 1, 0) == step_seed(0, 1, 0)


# ---- artifacts -------------------------------------------------------------------------------
def test_save_load_var_round_trip(tmp_path, tiny_var_cfg):
    model = VAR(tiny_var_cfg).eval()
    save_var(tmp_path / "var.pt", model, ["a", "b", "c", "d", "e"], extra={"steps": 3})
    loaded, meta = load_var(tmp_path / "var.pt")
    x = torch.randn(2, tiny_var_cfg.L - 1, tiny_var_cfg.Cvae)
    lab = torch.tensor([0, 4])
    assert torch.equal(loaded(lab, x), model(lab, x))
    assert meta["class_names"] == ["a", "b", "c", "d", "e"] and meta["num_classes"] == 5 and meta["steps"] == 3
    assert loaded.cfg == tiny_var_cfg
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ArtifactError, match="bad.pt: cannot read VAR checkpoint"):
        load_var(tmp_path / "bad.pt")


def test_load_var_drops_retired_config_fields_and_names_unknown_ones(tmp_path, tiny_var_cfg):
    """A checkpoint saved while VARConfig had qk_norm_impl loads as the same model; a field
    that this varcore does not know is an error that names the file and the field."""
    model = VAR(tiny_var_cfg).eval()
    save_var(tmp_path / "var.pt", model)
    ckpt = torch.load(tmp_path / "var.pt", weights_only=True)
    ckpt["config"]["qk_norm_impl"] = "explicit"
    torch.save(ckpt, tmp_path / "old.pt")
    loaded, _ = load_var(tmp_path / "old.pt")
    assert loaded.cfg == tiny_var_cfg
    ckpt["config"]["rope_theta"] = 10000.0
    torch.save(ckpt, tmp_path / "future.pt")
    with pytest.raises(ArtifactError, match=r"future.pt: .*\['rope_theta'\]"):
        load_var(tmp_path / "future.pt")


def _inputs(params, tok, tokens):
    paths = TrainPaths(tok, tokens, *(Path("unused") for _ in range(4)))
    return load_inputs(load_train_var_config(params, "params.yaml", 2), paths)


def test_load_inputs_checks_tokenizer_and_manifest(tmp_path):
    tok, tokens = write_synthetic_artifacts(tmp_path, TINY_VQ, n_train=32, n_val=8, num_classes=3)
    inputs = _inputs(tiny_params(), tok, tokens)
    assert inputs.cfg.depth == 2 and inputs.cfg.num_classes == 3 and inputs.cfg.L == 30
    assert inputs.train[0].shape == (32, 30) and inputs.val[1].shape == (8,)
    assert inputs.class_names == ["class0", "class1", "class2"]
    bad = tiny_params()
    bad["tokenizer"]["model"]["vocab_size"] = 32
    with pytest.raises(ArtifactError, match="vocab_size"):
        _inputs(bad, tok, tokens)
    other = tmp_path / "other"
    tok2, _ = write_synthetic_artifacts(other, TINY_VQ, n_train=32, n_val=8, seed=1)  # other weights
    with pytest.raises(ArtifactError, match="tokenizer_sha256"):
        _inputs(tiny_params(), tok2, tokens)


DATA = Path(__file__).parent / "data"


def test_checkpoint_written_before_the_restructure_loads_and_computes_the_same(tmp_path):
    """models/var-dD.pt of 2026-11-26 kept execution choices in its config (attn_impl, mlp_impl,
    compile_blocks, checkpointing, ...); it loads, and gives the logits it gave then (float32:
    round-off of a depth-1, width-16 forward, about eps32 x 64-term sums x 10 chained ops = 4e-5)."""
    model, meta = load_var(DATA / "var-legacy-2026-11-26.pt")
    ref = torch.load(DATA / "var-legacy-2026-11-26-io.pt", weights_only=True)
    with torch.no_grad():
        logits = model(ref["label"], ref["x"])
    assert meta["class_names"] == ["a", "b", "c"] and model.cfg.depth == 1 and model.cfg.C == 16
    assert torch.allclose(logits, ref["logits"], rtol=0, atol=4e-5 * ref["logits"].abs().max().item())


class _RunsCode:
    """Unpickling this would create ``marker`` (a stand-in for arbitrary code)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    from pipeline.tokenizer.checkpoint import load_tokenizer
    from pipeline.training.state import read_state_file
    marker = tmp_path / "code-ran"
    evil = {"format": "varscale.var.v1", "config": _RunsCode(marker), "state_dict": {}}
    torch.save(evil, tmp_path / "var-d1.pt")
    torch.save({**evil, "format": "varscale.tokenizer.v1"}, tmp_path / "tokenizer.pt")
    (tmp_path / "ray").mkdir()
    torch.save({"model": {}, "state": _RunsCode(marker)}, tmp_path / "ray" / "state.pt")
    with pytest.raises(ArtifactError, match="var-d1.pt: cannot read VAR checkpoint"):
        load_var(tmp_path / "var-d1.pt")
    with pytest.raises(ArtifactError, match="tokenizer.pt: cannot read tokenizer checkpoint"):
        load_tokenizer(tmp_path / "tokenizer.pt")
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        read_state_file(tmp_path / "ray")
    assert not marker.exists()
