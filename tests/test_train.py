"""The train stage without Ray: params, compute accounting, validation metrics, schedules, I/O."""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from pipeline.artifacts import ArtifactError
from pipeline.config import ParamsError, read_params
from pipeline.metrics import TokenStats, eval_steps, lr_at, summarize, token_stats, train_compute
from pipeline.train import load_inputs, summarize_run
from pipeline.train_artifacts import load_var, save_var
from pipeline.train_config import load_train_params, load_var_params
from pipeline.train_loop import evaluate, global_batch_indices, rank_slice, step_seed
from pipeline.train_synthetic import write_synthetic_artifacts
from varcore import VAR, VARConfig, VQVAEConfig
from varcore.flops import count_main_params, count_params, main_N, paper_N, var_flops
from varcore.var import scale_ids

TINY_VQ = VQVAEConfig(image_size=16, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, mid_attn=False, Cvae=8,
                      vocab_size=64, patch_nums=(1, 2, 3, 4))


def tiny_params(**train):
    return {"tokenizer": {"model": {"image_size": 16, "ch": 16, "ch_mult": [1, 2, 2], "mid_attn": False, "Cvae": 8,
                                    "vocab_size": 64, "patch_nums": [1, 2, 3, 4]}},
            "var": {"model": {}}, "train": {"depths": [1], "batch_size": 16, "steps": 4, **train}}


# ---- params ----------------------------------------------------------------------------------
def test_repo_params_load():
    params = read_params("params.yaml")
    tp = load_train_params(params)
    load_var_params(params)
    assert len(tp.depths) >= 4 and tp.peak_lr == pytest.approx(tp.lr * tp.batch_size / 256)


@pytest.mark.parametrize("section, message", [
    ({"train": {"steps": 10, "batch_size": 0}}, "params.yaml:train.batch_size: must be >= 1"),
    ({"train": {"steps": 10, "ray": {"num_workers": 0}}}, "params.yaml:train.ray.num_workers"),
    ({"train": {"steps": 10, "batch_size": 7, "ray": {"num_workers": 2}}}, "train.batch_size: 7 is not divisible"),
    ({"train": {"steps": 10, "epochs": 2}}, "train.steps: set exactly one of steps and epochs"),
    ({"train": {"steps": 10, "decay": "step"}}, "train.decay"),
    ({"train": {"steps": 10, "ray": {"gpus": 1}}}, "train.ray: unknown key(s) ['gpus']"),
    ({"train": {"steps": 10, "depths": [2, 2]}}, "train.depths: has duplicates"),
    ({"train": {"steps": 10, "cuda_graph": "yes"}}, "train.cuda_graph: must be 'auto', true or false"),
    ({"train": {"steps": 10, "cuda_graph": True}}, "train.cuda_graph: true needs one GPU worker"),
    ({"train": {"steps": 10, "master_weights": "on"}}, "train.master_weights: must be 'auto', true or false"),
    ({"train": {"steps": 10, "master_weights": True, "precision": "fp32", "ray": {"use_gpu": True}}},
     "train.master_weights: true needs bf16 training"),
    ({"train": {"steps": 10, "cuda_graph": True, "ray": {"use_gpu": True, "num_workers": 2}}},
     "train.cuda_graph: true needs one GPU worker"),
])
def test_bad_train_params_name_the_key(section, message):
    with pytest.raises(ParamsError, match=None) as e:
        load_train_params(section)
    assert message in str(e.value)


def test_var_model_cannot_override_depth_or_tokenizer_fields():
    with pytest.raises(ParamsError, match=r"params.yaml:var.model: \['depth'\] are set by train.depths"):
        load_var_params({"var": {"model": {"depth": 3}}})


def test_epochs_give_steps():
    tp = load_train_params({"train": {"steps": None, "epochs": 2.5, "batch_size": 10}})
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
    tp = load_train_params({"train": {"steps": 6, "batch_size": 8}})
    model = VAR(cfg)
    row = {"step": 6, "tokens": 6 * 8 * 14, "compute": 0.0, "L_last": 2.0, "L_mean": 1.5, "Err_last": 0.5,
           "Err_mean": 0.25}
    payload = {"model": model.state_dict(), "state": {"step": 6, "curve": [row],
                                                      "train_curve": [{"step": 6, "train_loss": 1.25}]}}

    class Inputs:
        pass
    inputs = Inputs()
    inputs.cfg = cfg
    m, m_model = summarize_run(inputs, tp, payload, 1.0)
    assert m["N"] == 73728 * 8 == m["N_counted_main"]
    assert m["params_total"] == count_params(model)
    assert m["tokens"] == 6 * 8 * 14 and m["images_seen"] == 48
    assert m["compute"] == pytest.approx(var_flops(cfg).train_per_token * 6 * 8 * 14)
    assert m["compute_6NT"] == 6 * m["N"] * m["tokens"]
    assert (m["L_mean"], m["L_last"], m["Err_mean"], m["Err_last"], m["train_loss"]) == (1.5, 2.0, 0.25, 0.5, 1.25)
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
    s = summarize(token_stats(FixedTokenModel(cfg)(torch.tensor([0]), None), tokens, scale_ids(cfg.patch_nums), 2))
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
                         scale_ids(cfg.patch_nums), 4) for i in (0, 5)]
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
    ckpt = torch.load(tmp_path / "var.pt", weights_only=False)
    ckpt["config"]["qk_norm_impl"] = "explicit"
    torch.save(ckpt, tmp_path / "old.pt")
    loaded, _ = load_var(tmp_path / "old.pt")
    assert loaded.cfg == tiny_var_cfg
    ckpt["config"]["rope_theta"] = 10000.0
    torch.save(ckpt, tmp_path / "future.pt")
    with pytest.raises(ArtifactError, match=r"future.pt: .*\['rope_theta'\]"):
        load_var(tmp_path / "future.pt")


def test_load_inputs_checks_tokenizer_and_manifest(tmp_path):
    tok, tokens = write_synthetic_artifacts(tmp_path, TINY_VQ, n_train=32, n_val=8, num_classes=3)
    inputs = load_inputs(tiny_params(), 2, tok, tokens)
    assert inputs.cfg.depth == 2 and inputs.cfg.num_classes == 3 and inputs.cfg.L == 30
    assert inputs.train[0].shape == (32, 30) and inputs.val[1].shape == (8,)
    assert inputs.class_names == ["class0", "class1", "class2"]
    bad = tiny_params()
    bad["tokenizer"]["model"]["vocab_size"] = 32
    with pytest.raises(ArtifactError, match="vocab_size"):
        load_inputs(bad, 2, tok, tokens)
    other = tmp_path / "other"
    tok2, _ = write_synthetic_artifacts(other, TINY_VQ, n_train=32, n_val=8, seed=1)  # other weights
    with pytest.raises(ArtifactError, match="tokenizer_sha256"):
        load_inputs(tiny_params(), 2, tok2, tokens)
