"""Sampling: determinism, CFG schedule, top-k/top-p, zero-shot in/out-painting and editing."""

import pytest
import torch

from varcore import ConfigError, SamplingConfig, edit_class, generate, inpaint, outpaint, sample_tokens
from varcore.sample import (TOP_K_TIE_SLACK, Teacher, box_mask, filter_logits, guidance, ranked_candidates,
                            sample_logits, scale_keep_masks)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_same_seed_same_samples(tiny_var, tiny_vqvae):
    label = torch.tensor([0, 1, 2, 3])
    s = SamplingConfig(cfg=1.5, top_k=20, top_p=0.9)
    a, fa = sample_tokens(tiny_var, tiny_vqvae.quantizer, label, s, _gen(7))
    b, fb = sample_tokens(tiny_var, tiny_vqvae.quantizer, label, s, _gen(7))
    c, _ = sample_tokens(tiny_var, tiny_vqvae.quantizer, label, s, _gen(8))
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and torch.equal(fa, fb)
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    assert [tuple(x.shape) for x in a] == [(4, p, p) for p in tiny_vqvae.quantizer.patch_nums]


def test_generate_decodes_sampled_tokens(tiny_var, tiny_vqvae):
    label = torch.tensor([1, 2])
    img = generate(tiny_var, tiny_vqvae, label, SamplingConfig(cfg=0.0, top_k=0, top_p=1.0), _gen(3))
    idx, _ = sample_tokens(tiny_var, tiny_vqvae.quantizer, label, SamplingConfig(cfg=0.0, top_k=0, top_p=1.0), _gen(3))
    assert img.shape == (2, 3, 16, 16)
    assert torch.allclose(img, tiny_vqvae.idx_to_img(idx), atol=1e-5)


def test_guidance_grows_from_zero_to_cfg():
    assert [guidance(k, 5, 2.0) for k in range(5)] == [0.0, 0.5, 1.0, 1.5, 2.0]


def test_cfg_does_not_change_first_scale(tiny_var, tiny_vqvae):
    # t = 0 at the first scale, so its logits and (same generator) its tokens match no-CFG sampling
    label = torch.tensor([0, 1, 2])
    with_cfg, _ = sample_tokens(tiny_var, tiny_vqvae.quantizer, label, SamplingConfig(cfg=3.0, top_k=0, top_p=1.0), _gen(1))
    no_cfg, _ = sample_tokens(tiny_var, tiny_vqvae.quantizer, label, SamplingConfig(cfg=0.0, top_k=0, top_p=1.0), _gen(1))
    assert torch.equal(with_cfg[0], no_cfg[0])


def test_top_k_and_top_p_filtering():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(filter_logits(logits, top_k=0, top_p=0.8))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(filter_logits(logits, top_k=3, top_p=1.0))
    assert kept.tolist() == [[True, True, True, False]]
    # the most likely token survives any top_p
    assert torch.isfinite(filter_logits(logits, 0, 0.01)).tolist() == [[True, False, False, False]]
    # shuffled order: filtering follows values, not positions
    perm = torch.tensor([2, 0, 3, 1])
    kept = torch.isfinite(filter_logits(logits[:, perm], 0, 0.8))
    assert kept.tolist() == [[False, True, False, True]]


FILTERS = [(900, 0.96), (50, 0.5), (0, 0.8), (50, 1.0), (0, 1.0), (1, 0.96)]


@pytest.mark.parametrize("top_k, top_p", FILTERS)
def test_ranked_candidates_are_the_filtered_sets(top_k, top_p):
    """The tokens left with non-zero weight are exactly filter_logits' (continuous logits: no
    ties), with its probabilities once normalised, up to float32 rounding (softmax sums over ~k
    instead of V terms, and one more division: a few ulp)."""
    logits = torch.randn(256, 4096, generator=_gen(0)) * 3
    ref = filter_logits(logits, top_k, top_p).softmax(-1)
    probs_Nn, idx_Nn = ranked_candidates(logits, top_k, top_p)
    probs_NV = probs_Nn if idx_Nn is None else torch.zeros_like(ref).scatter(-1, idx_Nn, probs_Nn)
    assert torch.equal(probs_NV > 0, ref > 0)
    assert torch.allclose(probs_NV / probs_NV.sum(-1, keepdim=True), ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("top_k, top_p", FILTERS)
def test_sample_logits_draws_what_multinomial_draws(top_k, top_p):
    """The exponential race over the ranked candidates, with one Exp(1) draw per vocabulary entry,
    picks the token torch.multinomial picks from filter_logits' distribution for the same
    generator state (continuous logits); it is how multinomial draws one sample."""
    logits = torch.randn(512, 1, 4096, generator=_gen(1)) * 3
    ref = torch.multinomial(filter_logits(logits[:, 0], top_k, top_p).softmax(-1), 1, generator=_gen(2))
    assert torch.equal(sample_logits(logits, top_k, top_p, _gen(2)), ref)


def test_top_k_keeps_ties_with_the_kth_logit():
    """bf16 logits tie: every logit equal to the k-th largest stays a candidate, as in the
    official filter (up to TOP_K_TIE_SLACK extra)."""
    logits = torch.tensor([[3.0, 2.0, 2.0, 2.0, 1.0, 0.5]])
    probs, idx = ranked_candidates(logits, top_k=2, top_p=1.0)
    kept = set(idx[probs > 0].tolist())
    assert kept == {0, 1, 2, 3} and torch.isfinite(filter_logits(logits, 2, 1.0)).sum() == 4
    wide = torch.cat([torch.tensor([[5.0]]), torch.full((1, 40), 1.0), torch.zeros(1, 40)], 1)
    probs, idx = ranked_candidates(wide, top_k=2, top_p=1.0)
    assert int((probs > 0).sum()) == 2 + TOP_K_TIE_SLACK   # 41 tied with the 2nd: the slack bounds what is kept


def test_samples_obey_top_k(tiny_var, tiny_vqvae):
    # with top_k=1, sampling is greedy and independent of the seed
    s = SamplingConfig(cfg=1.0, top_k=1, top_p=1.0)
    a, _ = sample_tokens(tiny_var, tiny_vqvae.quantizer, torch.tensor([0, 1]), s, _gen(1))
    b, _ = sample_tokens(tiny_var, tiny_vqvae.quantizer, torch.tensor([0, 1]), s, _gen(2))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_keep_all_teacher_reproduces_its_tokens(tiny_var, tiny_vqvae):
    img = torch.rand(2, 3, 16, 16) * 2 - 1
    idx = tiny_vqvae.img_to_idx(img)
    keep = [torch.ones_like(i, dtype=torch.bool) for i in idx]
    out, f_hat = sample_tokens(tiny_var, tiny_vqvae.quantizer, torch.tensor([0, 1]),
                               generator=_gen(0), teacher=Teacher(idx, keep))
    assert all(torch.equal(a, b) for a, b in zip(out, idx))
    assert torch.allclose(f_hat, tiny_vqvae.quantizer.idx_to_f_hat(idx), atol=1e-6)


def test_inpainting_keeps_tokens_outside_mask(tiny_var, tiny_vqvae):
    img = torch.rand(2, 3, 16, 16) * 2 - 1
    regen = box_mask(2, 16, (4, 4, 12, 12))
    out_img, idx, teacher = inpaint(tiny_var, tiny_vqvae, img, regen, torch.tensor([0, 1]),
                                    SamplingConfig(cfg=1.0, top_k=0, top_p=1.0), _gen(0))
    assert out_img.shape == img.shape
    changed_inside = 0
    for k, (got, ref, keep) in enumerate(zip(idx, teacher.idx_list, teacher.keep_masks)):
        assert torch.equal(got[keep], ref[keep])
        changed_inside += (got[~keep] != ref[~keep]).sum().item()
    assert changed_inside > 0
    # the 4x4 finest scale: the central 2x2 cells are regenerated, the ring is kept
    assert teacher.keep_masks[-1][0].tolist() == [[True] * 4, [True, False, False, True],
                                                  [True, False, False, True], [True] * 4]
    assert teacher.keep_masks[0].all()   # a 1x1 cell only 25% covered keeps the original token


def test_outpainting_keeps_center(tiny_var, tiny_vqvae):
    img = torch.rand(1, 3, 16, 16) * 2 - 1
    keep = box_mask(1, 16, (4, 4, 12, 12))
    _, idx, teacher = outpaint(tiny_var, tiny_vqvae, img, keep, torch.tensor([2]), generator=_gen(0))
    assert teacher.keep_masks[-1][0, 1:3, 1:3].all() and not teacher.keep_masks[-1][0, 0].any()
    for got, ref, k in zip(idx, teacher.idx_list, teacher.keep_masks):
        assert torch.equal(got[k], ref[k])


def test_class_edit_regenerates_box_under_new_label(tiny_var, tiny_vqvae):
    img = torch.rand(1, 3, 16, 16) * 2 - 1
    _, idx, teacher = edit_class(tiny_var, tiny_vqvae, img, (0, 0, 8, 8), torch.tensor([4]), generator=_gen(0))
    assert not teacher.keep_masks[-1][0, :2, :2].any() and teacher.keep_masks[-1][0, 2:, :].all()
    for got, ref, k in zip(idx, teacher.idx_list, teacher.keep_masks):
        assert torch.equal(got[k], ref[k])


def test_scale_keep_masks_cover_rule():
    regen = torch.zeros(1, 8, 8, dtype=torch.bool)
    regen[:, :, :4] = True                                   # left half
    masks = scale_keep_masks(regen, (1, 2, 4))
    assert masks[0].tolist() == [[[False]]]                   # 50% covered -> regenerate
    assert masks[1].tolist() == [[[False, True], [False, True]]]


def test_bad_sampling_args_name_field():
    with pytest.raises(ConfigError) as e:
        SamplingConfig(top_p=0.0)
    assert e.value.field == "top_p"
    with pytest.raises(ConfigError) as e:
        box_mask(1, 8, (0, 0, 9, 4))
    assert e.value.field == "box"


def test_sampler_checks_tokenizer_fit(tiny_vqvae, tiny_var_cfg):
    from varcore import VAR, VARConfig
    var = VAR(VARConfig(depth=1, vocab_size=tiny_var_cfg.vocab_size * 2, Cvae=tiny_var_cfg.Cvae,
                        patch_nums=tiny_var_cfg.patch_nums, num_classes=5)).eval()
    with pytest.raises(ConfigError) as e:
        sample_tokens(var, tiny_vqvae.quantizer, torch.tensor([0]))
    assert e.value.field == "vocab_size"
