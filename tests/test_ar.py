"""The raster-scan AR baseline (varcore.ar): VAR's blocks under a token-causal mask, one token per call.

Models are randomised (``randomize_``) so no block is near the identity: with the init's
near-zero AdaLN gates, mask and cache tests would pass for any attention.
"""

import pytest
import torch

from pipeline.training.checkpoint import load_var, save_var
from varcore import VQVAE, VQVAEConfig
from varcore.ar import ARConfig, RasterAR, TokenCausalAttention, generate, sample_tokens, sequential_calls
from varcore.errors import ConfigError
from varcore.fast.plan import ExecutionPlan, apply_plan
from varcore.flops import count_main_params, main_N, var_flops
from varcore.quant import MultiScaleQuantizer
from varcore.sample import SamplingConfig
from varcore.var import VAR, VARConfig

from .conftest import randomize_

V, CVAE, SIDE = 32, 8, 4


@pytest.fixture
def ar() -> RasterAR:
    return randomize_(RasterAR(ARConfig(depth=2, vocab_size=V, Cvae=CVAE, patch_nums=(SIDE,), num_classes=3))).eval()


@pytest.fixture
def quant() -> MultiScaleQuantizer:
    return randomize_(MultiScaleQuantizer(V, CVAE, (SIDE,)), std=1.0)


def cached_logits(model: RasterAR, quant, label_B, tokens_BL) -> torch.Tensor:
    """Logits of every position from the KV-cached one-token-per-call loop, fed the given tokens."""
    cond = model.cond(label_B)
    caches, x, out = model.new_kv_caches(), model.sos(cond), []
    for t in range(tokens_BL.shape[1]):
        out.append(model.forward_scale(x, cond, t, caches))
        x = model.word_embed(quant.embedding(tokens_BL[:, t:t + 1]))
    return torch.cat(out, 1)


def test_kv_cached_sampling_path_equals_the_masked_forward(ar, quant):
    """Acceptance: teacher-forced logits within 1e-5 in float32. The two paths sum the same
    products in different orders (one masked SDPA over L keys vs L calls over growing caches);
    logits here are O(1) and float32's epsilon is 1.2e-7, so a depth-2 model stays ~100x inside."""
    tok = torch.randint(0, V, (5, SIDE * SIDE))
    lab = torch.tensor([0, 1, 2, 0, 3])   # 3: the null class
    full = ar(lab, ar.teacher_inputs(quant, tok))
    assert full.shape == (5, SIDE * SIDE, V)
    assert full.abs().max() > 0.1   # randomised: not trivially small
    torch.testing.assert_close(cached_logits(ar, quant, lab, tok), full, atol=1e-5, rtol=0)


def test_attention_is_token_causal(ar, quant):
    """Changing token t changes the logits of positions > t only (position t + 1 reads it)."""
    tok = torch.randint(0, V, (2, SIDE * SIDE))
    lab = torch.tensor([1, 2])
    t = 7
    other = tok.clone()
    other[:, t] = (other[:, t] + 1) % V
    a, b = ar(lab, ar.teacher_inputs(quant, tok)), ar(lab, ar.teacher_inputs(quant, other))
    assert torch.equal(a[:, :t + 1], b[:, :t + 1])
    assert (a[:, t + 1] - b[:, t + 1]).abs().max() > 1e-4


def test_ar_and_var_of_one_depth_share_block_parameter_counts():
    for depth in (1, 2, 4):
        a = RasterAR(ARConfig(depth=depth, vocab_size=V, Cvae=CVAE, patch_nums=(SIDE,), num_classes=3))
        v = VAR(VARConfig(depth=depth, vocab_size=V, Cvae=CVAE, patch_nums=(1, 2, 3, SIDE), num_classes=3))
        block = [sum(p.numel() for p in b.parameters()) for b in a.blocks]
        assert block == [sum(p.numel() for p in b.parameters()) for b in v.blocks]
        assert count_main_params(a) == count_main_params(v) == main_N(a.cfg) == 73728 * depth ** 3
        # the whole models differ only by the position table (L entries each) and the level table
        diff = sum(p.numel() for p in v.parameters()) - sum(p.numel() for p in a.parameters())
        assert diff == (v.cfg.L - a.cfg.L) * a.cfg.C + (len(v.cfg.patch_nums) - 1) * a.cfg.C


def test_greedy_sampling_reproduces_its_own_argmax(ar, quant):
    """With top-k 1 and no CFG every sampled token is the argmax of the teacher-forced logits of
    the sequence sampled so far: the sampler feeds back exactly what it drew."""
    lab = torch.tensor([0, 1, 2])
    idx, f_hat = sample_tokens(ar, quant, lab, SamplingConfig(cfg=0.0, top_k=1, top_p=1.0))
    assert idx.shape == (3, SIDE, SIDE) and f_hat.shape == (3, CVAE, SIDE, SIDE)
    tok = idx.flatten(1)
    assert torch.equal(ar(lab, ar.teacher_inputs(quant, tok)).argmax(-1), tok)
    torch.testing.assert_close(f_hat, quant.idx_to_f_hat([idx]))


def test_cfg_mixes_conditional_and_null_logits(ar, quant):
    """One draw with CFG s equals a draw from ``(1 + s) l_c - s l_u`` computed by hand (same generator)."""
    lab = torch.tensor([2])
    s = SamplingConfig(cfg=1.5, top_k=0, top_p=1.0)
    idx, _ = sample_tokens(ar, quant, lab, s, torch.Generator().manual_seed(3))
    tok = idx.flatten(1)
    lc = ar(lab, ar.teacher_inputs(quant, tok))
    lu = ar(torch.tensor([3]), ar.teacher_inputs(quant, tok))
    probs = ((1 + 1.5) * lc - 1.5 * lu).softmax(-1)
    g = torch.Generator().manual_seed(3)
    redraw = torch.stack([torch.multinomial(probs[0, t:t + 1], 1, generator=g)[0, 0] for t in range(tok.shape[1])])
    assert torch.equal(redraw, tok[0])


def test_generate_images_and_determinism(quant):
    vq_cfg = VQVAEConfig(image_size=16, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, Cvae=CVAE, vocab_size=V,
                         patch_nums=(SIDE,))
    vq = VQVAE(vq_cfg).eval()
    model = randomize_(RasterAR(ARConfig(depth=1, vocab_size=V, Cvae=CVAE, patch_nums=(SIDE,), num_classes=3))).eval()
    a = generate(model, vq, torch.tensor([0, 1]), generator=torch.Generator().manual_seed(0))
    b = generate(model, vq, torch.tensor([0, 1]), generator=torch.Generator().manual_seed(0))
    assert a.shape == (2, 3, 16, 16) and torch.equal(a, b)


def test_config_plan_and_flops():
    with pytest.raises(ConfigError, match="patch_nums"):
        ARConfig(depth=1, patch_nums=(1, 2))
    with pytest.raises(ConfigError, match="token_order"):
        RasterAR(VARConfig(depth=1, patch_nums=(4,)))
    cfg = ARConfig(depth=2, vocab_size=V, Cvae=CVAE, patch_nums=(SIDE,), num_classes=3)
    assert (cfg.L, cfg.first_l, cfg.token_order) == (16, 1, "raster")
    assert sequential_calls(cfg) == 16
    assert sequential_calls(VARConfig(depth=2)) == 10   # the paper's 10 scales
    assert cfg.attention_pairs() == 16 * 17 // 2
    f = var_flops(cfg)
    w = cfg.C
    assert f.attention == 4.0 * w * (16 * 17 // 2) * 2
    assert f.embed_head == 2.0 * (15 * CVAE * w + 16 * w * V)
    # plans: auto is dense (token-causal SDPA) even on CUDA; block-causal kernels are refused
    assert ExecutionPlan().resolve(cfg, "cpu", training=True).attention == "dense"
    with pytest.raises(ConfigError, match="attention"):
        ExecutionPlan(attention="flex").resolve(cfg, "cpu", training=True)
    model = apply_plan(RasterAR(cfg), ExecutionPlan(compile=False).resolve(cfg, "cpu", training=True))
    assert all(isinstance(b.attn.core, TokenCausalAttention) for b in model.blocks)


def test_checkpoint_round_trip_keeps_the_kind(tmp_path, ar, quant):
    save_var(tmp_path / "ar-d2.pt", ar, ["a", "b", "c"])
    loaded, meta = load_var(tmp_path / "ar-d2.pt")
    assert type(loaded) is RasterAR and loaded.cfg == ar.cfg and meta["format"] == "varscale.ar.v1"
    tok = torch.randint(0, V, (2, SIDE * SIDE))
    lab = torch.tensor([0, 1])
    assert torch.equal(loaded(lab, loaded.teacher_inputs(quant, tok)), ar(lab, ar.teacher_inputs(quant, tok)))
