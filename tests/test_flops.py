"""Parameter count (eq. 8) and FLOP accounting."""

import pytest
import torch

from varcore import VAR, VARConfig, count_main_params, count_params, main_N, paper_N, var_flops
from varcore.flops import attention_pairs


@pytest.mark.parametrize("d", [6, 12, 16])
def test_main_params_equal_73728_d_cubed(d):
    cfg = VARConfig(depth=d)
    with torch.device("meta"):
        model = VAR(cfg)
    assert cfg.C == 64 * d and cfg.H == d
    assert count_main_params(model) == paper_N(d) == 73728 * d ** 3 == main_N(cfg)
    # Everything else is stated here: per block, biases (q, v, proj 1C each, fc1 4C, fc2 1C,
    # AdaLN 6C) + H attention temperatures; globally the class table (incl. null class),
    # start/absolute/level positions, word embedding, head AdaLN and the V-way head.
    C, V, L, K = cfg.C, cfg.vocab_size, cfg.L, len(cfg.patch_nums)
    extras = d * (14 * C + cfg.H)
    extras += (cfg.num_classes + 1) * C + cfg.first_l * C + L * C + K * C
    extras += cfg.Cvae * C + C + 2 * C * C + 2 * C + C * V + V
    assert count_params(model) - count_main_params(model) == extras


def test_shape_rule_and_drop_path():
    cfg = VARConfig(depth=24)
    assert (cfg.C, cfg.H, cfg.C // cfg.H) == (1536, 24, 64)
    assert cfg.dpr == pytest.approx(0.1)
    with torch.device("meta"):
        m = VAR(VARConfig(depth=12))
    rates = [b.drop_path.p for b in m.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.05)
    assert all(a < b for a, b in zip(rates, rates[1:]))


def test_attention_pairs_hand_count():
    # scales 1, 2: token 0 sees 1 token; the 4 tokens of scale 2 see 5 each.
    assert attention_pairs((1, 2)) == 1 * 1 + 4 * 5
    assert attention_pairs((1, 2, 3)) == 1 + 4 * 5 + 9 * 14


def test_flops_hand_count_tiny():
    cfg = VARConfig(depth=1, width=8, num_heads=2, vocab_size=10, Cvae=4, patch_nums=(1, 2), num_classes=3)
    f = var_flops(cfg)
    L, w = 5, 8
    assert f.linear == 2 * L * (4 * w * w + 2 * 32 * w)          # qkv+proj+fc1+fc2 per token
    assert f.attention == 4 * w * (1 * 1 + 4 * 5)                 # allowed pairs only
    assert f.adaln == 2 * (6 * w * w + 2 * w * w)                 # once per image
    assert f.embed_head == 2 * (4 * 4 * w + L * w * 10)
    assert f.train_per_token == pytest.approx(3 * f.forward / L)
    assert var_flops(cfg, dense_attention=True).attention == 4 * w * L * L


def test_paper_scale_flops_dominated_by_linear():
    f = var_flops(VARConfig(depth=16))
    # per token, training ~ 6 N(d) + attention + head: check against the 6N rule of thumb
    six_n = 6 * paper_N(16) * (1 - 6 / 18)  # AdaLN is per image, not per token
    assert 1.0 < f.train_per_token / six_n < 1.35
