"""VAR transformer: sequence length, block-causal mask, KV cache, AdaLN/QK-norm, configs."""

import math

import pytest
import torch

from varcore import PAPER_PATCH_NUMS, VAR, VARConfig, ConfigError, VQVAEConfig, block_causal_mask
from varcore.scales import ScaleLayout


def scale_ids(patch_nums):
    return ScaleLayout(patch_nums).scale_ids()


def test_paper_sequence_length_is_680():
    cfg = VARConfig(depth=16)
    assert cfg.patch_nums == (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    assert cfg.L == 680 and cfg.first_l == 1


def test_block_causal_mask_sees_exactly_earlier_and_same_scales():
    m = block_causal_mask(PAPER_PATCH_NUMS)
    s = scale_ids(PAPER_PATCH_NUMS)
    assert m.shape == (680, 680)
    starts = [0]
    for pn in PAPER_PATCH_NUMS:                              # counted here, not with ScaleLayout
        starts.append(starts[-1] + pn * pn)
    for k in range(len(PAPER_PATCH_NUMS)):
        for i in (starts[k], starts[k + 1] - 1):          # first and last token of scale k
            visible = m[i].nonzero().flatten()
            assert visible.tolist() == list(range(starts[k + 1]))   # all of scales <= k, nothing later
    assert torch.equal(m, s[None, :] <= s[:, None])


def test_model_respects_the_mask(tiny_var, tiny_var_cfg):
    """Changing the input of scale 3 changes logits of scales >= 3 only."""
    cfg = tiny_var_cfg
    B, L = 2, cfg.L
    label = torch.tensor([1, 3])
    x = torch.randn(B, L - cfg.first_l, cfg.Cvae)
    base = tiny_var(label, x)
    s = scale_ids(cfg.patch_nums)
    x2 = x.clone()
    pos3 = (s == 2).nonzero().flatten() - cfg.first_l           # input positions of the 3rd scale
    x2[:, pos3] += 1.0
    out = tiny_var(label, x2)
    early, late = s < 2, s >= 2
    assert torch.equal(out[:, early], base[:, early])
    assert (out[:, late] - base[:, late]).abs().amax(dim=-1).min() > 1e-6


@pytest.mark.parametrize("shared_aln", [False, True])
def test_kv_cached_forward_equals_masked_forward(tiny_vq_cfg, shared_aln):
    from tests.conftest import randomize_
    cfg = VARConfig(depth=3, vocab_size=tiny_vq_cfg.vocab_size, Cvae=tiny_vq_cfg.Cvae,
                    patch_nums=tiny_vq_cfg.patch_nums, num_classes=5, shared_aln=shared_aln)
    var = randomize_(VAR(cfg)).eval()
    B = 3
    label = torch.tensor([0, 4, 5])                              # 5 is the null class
    x = torch.randn(B, cfg.L - cfg.first_l, cfg.Cvae)
    full = var(label, x)
    cond = var.cond(label)
    caches = var.new_kv_caches()
    out, start = [], 0
    x_in = var.sos(cond)
    for k, pn in enumerate(cfg.patch_nums):
        out.append(var.forward_scale(x_in, cond, start, caches))
        start += pn * pn
        if k + 1 < len(cfg.patch_nums):
            x_in = var.word_embed(x[:, start - cfg.first_l:start - cfg.first_l + cfg.patch_nums[k + 1] ** 2])
    cached = torch.cat(out, dim=1)
    rel = (cached - full).norm() / full.norm()
    assert cached.shape == (B, cfg.L, cfg.vocab_size)
    assert rel < 1e-4


def test_qk_l2_norm_and_temperature(tiny_var):
    attn = tiny_var.blocks[0].attn
    with torch.no_grad():
        attn.scale_mul_1H11.copy_(torch.log(torch.tensor([2.0, 50.0])).view(1, 2, 1, 1))
    q, k, v = attn.qkv_heads(torch.randn(2, 7, tiny_var.cfg.C))
    assert torch.allclose(k.norm(dim=-1), torch.ones(2, 2, 7), atol=1e-5)
    assert torch.allclose(q.norm(dim=-1)[:, 0], torch.full((2, 7), 2.0), atol=1e-4)
    assert torch.allclose(q.norm(dim=-1)[:, 1], torch.full((2, 7), 50.0), atol=1e-3)
    with torch.no_grad():
        attn.scale_mul_1H11.fill_(math.log(1000.0))              # capped at 100
    q, _, _ = attn.qkv_heads(torch.randn(1, 3, tiny_var.cfg.C))
    assert torch.allclose(q.norm(dim=-1), torch.full((1, 2, 3), 100.0), atol=1e-2)


def test_adaln_depends_on_class(tiny_var, tiny_var_cfg):
    x = torch.randn(1, tiny_var_cfg.L - 1, tiny_var_cfg.Cvae).expand(2, -1, -1)
    out = tiny_var(torch.tensor([0, 1]), x)
    assert (out[0] - out[1]).abs().max() > 1e-4


def test_class_dropout_rate(tiny_var_cfg):
    var = VAR(tiny_var_cfg).train()
    labels = torch.zeros(20000, dtype=torch.long)
    frac = (var.drop_class(labels) == tiny_var_cfg.num_classes).float().mean().item()
    assert abs(frac - 0.1) < 0.01
    assert torch.equal(var.eval().drop_class(labels), labels)


def test_init_starts_blocks_near_identity(tiny_var_cfg):
    var = VAR(tiny_var_cfg).eval()
    x = torch.randn(2, var.cfg.L, var.cfg.C)
    cond = var.cond(torch.tensor([0, 1]))
    y = var.blocks[0](x, var.block_cond(cond))
    assert (y - x).abs().max() < 1e-3


@pytest.mark.parametrize("kwargs, field", [
    (dict(depth=0), "depth"),
    (dict(depth=2, patch_nums=(1, 3, 2)), "patch_nums"),
    (dict(depth=2, patch_nums=()), "patch_nums"),
    (dict(depth=2, vocab_size=1), "vocab_size"),
    (dict(depth=2, width=100, num_heads=3), "width"),
])
def test_invalid_var_config_names_field(kwargs, field):
    with pytest.raises(ConfigError) as e:
        VARConfig(**kwargs)
    assert e.value.field == field and field in str(e.value)


def test_invalid_vqvae_config_names_field():
    with pytest.raises(ConfigError, match="patch_nums") as e:
        VQVAEConfig(image_size=32, ch_mult=(1, 2, 2), patch_nums=(1, 2, 4))   # latent is 8
    assert e.value.field == "patch_nums" and "8" in str(e.value)
    with pytest.raises(ConfigError) as e:
        VQVAEConfig(image_size=30, ch_mult=(1, 2, 2))
    assert e.value.field == "image_size"


def test_tokenizer_transformer_mismatch_names_field(tiny_vq_cfg):
    cfg = VARConfig(depth=2, vocab_size=tiny_vq_cfg.vocab_size + 1, Cvae=tiny_vq_cfg.Cvae,
                    patch_nums=tiny_vq_cfg.patch_nums)
    with pytest.raises(ConfigError) as e:
        cfg.check_tokenizer(tiny_vq_cfg.vocab_size, tiny_vq_cfg.Cvae, tiny_vq_cfg.patch_nums)
    assert e.value.field == "vocab_size"
    cfg = VARConfig(depth=2, vocab_size=tiny_vq_cfg.vocab_size, Cvae=tiny_vq_cfg.Cvae, patch_nums=(1, 2, 4))
    with pytest.raises(ConfigError) as e:
        cfg.check_tokenizer(tiny_vq_cfg.vocab_size, tiny_vq_cfg.Cvae, tiny_vq_cfg.patch_nums)
    assert e.value.field == "patch_nums"


def test_forward_rejects_wrong_input_length(tiny_var, tiny_var_cfg):
    with pytest.raises(ValueError, match="teacher-forcing input"):
        tiny_var(torch.tensor([0]), torch.randn(1, tiny_var_cfg.L, tiny_var_cfg.Cvae))


def test_scale_layout_splits_and_flattens_the_sequence():
    lay = ScaleLayout((1, 2, 3))
    assert (lay.K, lay.L, lay.first_l, lay.lengths) == (3, 14, 1, (1, 4, 9))
    assert lay.starts == (0, 1, 5) and lay.ends == (1, 5, 14)
    assert lay.scale_ids().tolist() == [0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2]
    assert lay.attention_pairs() == 1 * 1 + 4 * 5 + 9 * 14
    idx = torch.arange(28).view(2, 14)
    maps = lay.split(idx)
    assert [tuple(m.shape) for m in maps] == [(2, 1, 1), (2, 2, 2), (2, 3, 3)]
    assert maps[1][1].flatten().tolist() == [15, 16, 17, 18]
    assert torch.equal(ScaleLayout.flatten(maps), idx)
    with pytest.raises(ConfigError):
        ScaleLayout((2, 1))
