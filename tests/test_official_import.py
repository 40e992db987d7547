"""The importer of the official checkpoints, without the official code: state dicts laid out as the
official VQ-VAE and VAR name and shape them (built here from the layout the official constructors
describe), imported and checked against a functional reference of the official VQ-VAE written
with torch.nn.functional (pad (0,1,0,1) then an unpadded stride-2 conv, attention after every res
block of the lowest level, 3 decoder blocks per level). The comparison against the official code
itself is benchmarks/official_parity.py (needs a checkout; result in benchmarks/RESULTS.md)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.errors import ArtifactError
from pipeline.files import sha256_file
from pipeline.official_import import import_official, var_key
from pipeline.tokenizer.checkpoint import load_tokenizer
from pipeline.training.checkpoint import load_var
from varcore import PAPER_PATCH_NUMS
from varcore.quant import MultiScaleQuantizer
from varcore.var import VAR, VARConfig

CH, CH_MULT, NRB, CVAE, V = 32, (1, 1, 2), 2, 8, 64
PATCH_NUMS = (1, 2, 3, 4, 5, 6, 7, 8)        # 32x32 images, 4x downsampling: 8x8 latent
NUM_PHI = 4


def params(**model) -> dict:
    tok = {"image_size": 32, "ch": CH, "ch_mult": list(CH_MULT), "num_res_blocks": NRB, "mid_attn": True,
           "level_attn": True, "downsample_pad": "bottom_right", "Cvae": CVAE, "vocab_size": V,
           "patch_nums": list(PATCH_NUMS), "num_phi": NUM_PHI, **model}
    return {"tokenizer": {"model": tok}, "var": {"model": {}}, "train": {"depths": [2], "steps": 1}, "execution": {}}


# ---- official layouts ------------------------------------------------------------------------------
def official_vae_state(g: torch.Generator) -> dict[str, torch.Tensor]:
    """Names and shapes as the official VQVAE(ch=CH, ...) with ch_mult CH_MULT registers them."""
    sd: dict[str, torch.Tensor] = {}

    def rnd(*shape, std=1.0):
        return torch.randn(*shape, generator=g) * std

    def conv(name, cin, cout, k):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = rnd(cout, cin, k, k, std=1 / math.sqrt(cin * k * k)), rnd(cout, std=0.1)

    def norm(name, c):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = 1 + rnd(c, std=0.1), rnd(c, std=0.1)

    def res(name, cin, cout):
        norm(f"{name}.norm1", cin), conv(f"{name}.conv1", cin, cout, 3)
        norm(f"{name}.norm2", cout), conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    def attn(name, c):
        norm(f"{name}.norm", c), conv(f"{name}.qkv", c, 3 * c, 1), conv(f"{name}.proj_out", c, c, 1)

    def mid(stack, c):
        res(f"{stack}.mid.block_1", c, c), attn(f"{stack}.mid.attn_1", c), res(f"{stack}.mid.block_2", c, c)

    n = len(CH_MULT)
    conv("encoder.conv_in", 3, CH, 3)
    c = CH
    for lvl in range(n):
        for b in range(NRB):
            res(f"encoder.down.{lvl}.block.{b}", c, CH * CH_MULT[lvl])
            c = CH * CH_MULT[lvl]
            if lvl == n - 1:
                attn(f"encoder.down.{lvl}.attn.{b}", c)
        if lvl != n - 1:
            conv(f"encoder.down.{lvl}.downsample.conv", c, c, 3)
    mid("encoder", c)
    norm("encoder.norm_out", c), conv("encoder.conv_out", c, CVAE, 3)
    c = CH * CH_MULT[-1]
    conv("decoder.conv_in", CVAE, c, 3)
    mid("decoder", c)
    for lvl in reversed(range(n)):
        for b in range(NRB + 1):
            res(f"decoder.up.{lvl}.block.{b}", c, CH * CH_MULT[lvl])
            c = CH * CH_MULT[lvl]
            if lvl == n - 1:
                attn(f"decoder.up.{lvl}.attn.{b}", c)
        if lvl != 0:
            conv(f"decoder.up.{lvl}.upsample.conv", c, c, 3)
    norm("decoder.norm_out", c), conv("decoder.conv_out", c, 3, 3)
    conv("quant_conv", CVAE, CVAE, 3), conv("post_quant_conv", CVAE, CVAE, 3)
    sd["quantize.embedding.weight"] = rnd(V, CVAE)
    for j in range(NUM_PHI):
        conv(f"quantize.quant_resi.qresi_ls.{j}", CVAE, CVAE, 3)
    sd["quantize.ema_vocab_hit_SV"] = torch.zeros(len(PATCH_NUMS), V)
    return sd


def official_var_state(model: VAR) -> dict[str, torch.Tensor]:
    """varcore's tensors under the official VAR's names, with the official buffers."""
    out = {}
    for k, t in model.state_dict().items():
        if k.startswith("head.head."):
            k = "head." + k[len("head.head."):]
        elif k.startswith("head.ada_lin."):
            k = "head_nm." + k[len("head."):]
        out[k.replace(".attn.qkv.", ".attn.mat_qkv.").replace(".ada_offset_116C", ".ada_gss")] = t.clone()
    L = model.cfg.L
    out["lvl_1L"] = torch.zeros(1, L)
    out["attn_bias_for_masking"] = torch.zeros(1, 1, L, L)
    for i in range(model.cfg.depth):
        out[f"blocks.{i}.attn.zero_k_bias"] = torch.zeros(model.cfg.C)
    return out


# ---- a functional reference of the official VQ-VAE --------------------------------------------------
def _conv(sd, name, x, stride=1, pad=None):
    w = sd[f"{name}.weight"]
    return F.conv2d(x, w, sd[f"{name}.bias"], stride=stride, padding=w.shape[-1] // 2 if pad is None else pad)


def _gn_silu(sd, name, x):
    return F.silu(F.group_norm(x, 32, sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-6))


def _res(sd, name, x):
    h = _conv(sd, f"{name}.conv1", _gn_silu(sd, f"{name}.norm1", x))
    h = _conv(sd, f"{name}.conv2", _gn_silu(sd, f"{name}.norm2", h))
    return (_conv(sd, f"{name}.nin_shortcut", x) if f"{name}.nin_shortcut.weight" in sd else x) + h


def _attn(sd, name, x):
    B, C, H, W = x.shape
    h = F.group_norm(x, 32, sd[f"{name}.norm.weight"], sd[f"{name}.norm.bias"], eps=1e-6)
    q, k, v = _conv(sd, f"{name}.qkv", h).reshape(B, 3, C, H * W).unbind(1)
    w = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(C), dim=-1)      # (B, HW_q, HW_k)
    return x + _conv(sd, f"{name}.proj_out", (v @ w.transpose(1, 2)).reshape(B, C, H, W))


def _mid(sd, stack, x):
    return _res(sd, f"{stack}.mid.block_2", _attn(sd, f"{stack}.mid.attn_1", _res(sd, f"{stack}.mid.block_1", x)))


def reference_encode(sd, img):
    n, h = len(CH_MULT), _conv(sd, "encoder.conv_in", img)
    for lvl in range(n):
        for b in range(NRB):
            h = _res(sd, f"encoder.down.{lvl}.block.{b}", h)
            if lvl == n - 1:
                h = _attn(sd, f"encoder.down.{lvl}.attn.{b}", h)
        if lvl != n - 1:
            h = _conv(sd, f"encoder.down.{lvl}.downsample.conv", F.pad(h, (0, 1, 0, 1)), stride=2, pad=0)
    h = _conv(sd, "encoder.conv_out", _gn_silu(sd, "encoder.norm_out", _mid(sd, "encoder", h)))
    return _conv(sd, "quant_conv", h)


def reference_decode(sd, f_hat):
    n = len(CH_MULT)
    h = _mid(sd, "decoder", _conv(sd, "decoder.conv_in", _conv(sd, "post_quant_conv", f_hat)))
    for lvl in reversed(range(n)):
        for b in range(NRB + 1):
            h = _res(sd, f"decoder.up.{lvl}.block.{b}", h)
            if lvl == n - 1:
                h = _attn(sd, f"decoder.up.{lvl}.attn.{b}", h)
        if lvl != 0:
            h = _conv(sd, f"decoder.up.{lvl}.upsample.conv", F.interpolate(h, scale_factor=2, mode="nearest"))
    return _conv(sd, "decoder.conv_out", _gn_silu(sd, "decoder.norm_out", h))


# ---- tests -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("official")
    g = torch.Generator().manual_seed(0)
    vae_sd = official_vae_state(g)
    torch.save(vae_sd, tmp / "vae.pth")
    torch.manual_seed(0)
    var = VAR(VARConfig(depth=2, vocab_size=V, Cvae=CVAE, patch_nums=PATCH_NUMS, num_classes=10)).eval()
    with torch.no_grad():
        for p in var.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    torch.save(official_var_state(var), tmp / "var_d2.pth")
    written = import_official(tmp / "vae.pth", tmp / "var_d2.pth", tmp / "out", params(), "params.yaml")
    return tmp, vae_sd, var, written


def test_imported_vqvae_computes_the_official_function(imported):
    tmp, sd, _, written = imported
    assert written == {"tokenizer": str(tmp / "out" / "tokenizer.pt"), "var": str(tmp / "out" / "var-d2.pt")}
    vq = load_tokenizer(tmp / "out" / "tokenizer.pt")
    img = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        f_ref, f = reference_encode(sd, img), vq.encode(img)
        # float32 sums in another order: ~1e-6 of the activations' scale
        assert f.shape == (2, CVAE, 8, 8) and torch.allclose(f, f_ref, atol=1e-5 * f_ref.abs().max().item())
        f_hat = torch.randn(2, CVAE, 8, 8, generator=torch.Generator().manual_seed(2))
        ref = reference_decode(sd, f_hat)
        assert torch.allclose(vq.f_hat_to_img(f_hat, clamp=False), ref, atol=1e-5 * ref.abs().max().item())
    q = vq.quantizer
    assert torch.equal(q.embedding.weight, sd["quantize.embedding.weight"])
    assert [q.phi_index(k) for k in range(len(PATCH_NUMS))] == [0, 0, 1, 1, 2, 2, 3, 3]
    for j in range(NUM_PHI):
        assert torch.equal(q.phis[j].weight, sd[f"quantize.quant_resi.qresi_ls.{j}.weight"])


def test_phi_choice_is_the_official_one():
    """4 shared convs over the paper's 10 scales: scale index 7 (13x13) takes conv 3 (a float tie
    that the official argmin breaks that way); one conv per scale maps scale k to conv k."""
    paper = MultiScaleQuantizer(16, 4, PAPER_PATCH_NUMS, num_phi=4)
    assert [paper.phi_index(k) for k in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    for K in range(1, 13):
        q = MultiScaleQuantizer(16, 4, tuple(range(1, K + 1)))
        assert [q.phi_index(k) for k in range(K)] == list(range(K))
    assert [MultiScaleQuantizer(16, 4, PAPER_PATCH_NUMS, num_phi=1).phi_index(k) for k in range(10)] == [0] * 10


def test_imported_var_is_the_same_function_and_fits_its_tokenizer(imported):
    tmp, _, var, _ = imported
    model, meta = load_var(tmp / "out" / "var-d2.pt")
    assert meta["tokenizer_sha256"] == sha256_file(tmp / "out" / "tokenizer.pt") and meta["imported_from"] == "var_d2.pth"
    for k, t in var.state_dict().items():
        assert torch.equal(model.state_dict()[k], t), k
    x = torch.randn(2, var.cfg.L - 1, CVAE, generator=torch.Generator().manual_seed(3))
    label = torch.tensor([3, 7])
    with torch.no_grad():
        assert torch.equal(model(label, x), var(label, x))
    from pipeline.training.checkpoint import check_fits   # evaluate, zeroshot and varscale accept the pair
    out = tmp / "out"
    check_fits(model, meta, load_tokenizer(out / "tokenizer.pt"), out / "var-d2.pt", out / "tokenizer.pt", 2)


def test_var_key_renames():
    assert var_key("blocks.3.attn.mat_qkv.weight") == "blocks.3.attn.qkv.weight"
    assert var_key("head_nm.ada_lin.1.weight") == "head.ada_lin.1.weight"
    assert var_key("head.bias") == "head.head.bias"
    assert var_key("blocks.0.ada_gss") == "blocks.0.ada_offset_116C"
    assert var_key("shared_ada_lin.1.weight") == "shared_ada_lin.1.weight"
    assert [var_key(k) for k in ("lvl_1L", "attn_bias_for_masking", "blocks.5.attn.zero_k_bias")] == [None] * 3


def test_shared_adaln_layout_imports(tmp_path, imported):
    """The d36 layout: one shared AdaLN projection and a per-block ``ada_gss`` offset."""
    tmp = imported[0]
    var = VAR(VARConfig(depth=2, vocab_size=V, Cvae=CVAE, patch_nums=PATCH_NUMS, num_classes=10, shared_aln=True))
    torch.save(official_var_state(var), tmp_path / "var_d2.pth")
    import_official(tmp / "vae.pth", tmp_path / "var_d2.pth", tmp_path / "out", params(), "params.yaml")
    model, _ = load_var(tmp_path / "out" / "var-d2.pt")
    assert model.cfg.shared_aln and torch.equal(model.blocks[1].ada_offset_116C, var.blocks[1].ada_offset_116C)


def test_mismatches_name_the_key_and_both_shapes(tmp_path, imported):
    tmp, vae_sd, var, _ = imported
    sd = torch.load(tmp / "var_d2.pth", weights_only=True)
    with pytest.raises(ArtifactError, match=r"var_d2.pth: holds 2 blocks, not --depth 3"):
        import_official(tmp / "vae.pth", tmp / "var_d2.pth", tmp_path / "a", params(), "params.yaml", depth=3)
    assert not (tmp_path / "a").exists()   # a bad VAR file: not even the tokenizer is written
    other_v = copy.copy(sd)   # a vocabulary of 128: the head has 128 rows
    other_v["head.weight"], other_v["head.bias"] = torch.zeros(128, var.cfg.C), torch.zeros(128)
    torch.save(other_v, tmp_path / "v128.pth")
    with pytest.raises(ArtifactError, match=r"v128.pth: key head.weight has shape \(128, 128\), .* expects "
                                            r"\(64, 128\) for head.head.weight"):
        import_official(tmp / "vae.pth", tmp_path / "v128.pth", tmp_path / "b", params(), "params.yaml")
    # the VQ-VAE of another layout: the params say one conv per scale, the file has 4 shared ones
    with pytest.raises(ArtifactError, match=r"vae.pth: key quantize.quant_resi.qresi_ls.0.weight .*|"
                                            r"vae.pth: no tensor for quantizer.phis.4.weight"):
        import_official(tmp / "vae.pth", None, tmp_path / "c", params(num_phi=None), "params.yaml")
    with pytest.raises(ArtifactError, match=r"vae.pth: key encoder.conv_in.weight has shape "
                                            r"\(32, 3, 3, 3\), .* expects \(16, 3, 3, 3\)"):
        import_official(tmp / "vae.pth", None, tmp_path / "d", params(ch=16), "params.yaml")
    missing = {k: v for k, v in vae_sd.items() if "attn.1" not in k}   # without the level attention
    torch.save(missing, tmp_path / "no_attn.pth")
    with pytest.raises(ArtifactError, match=r"no_attn.pth: no tensor for encoder.net.\d+.norm.weight"):
        import_official(tmp_path / "no_attn.pth", None, tmp_path / "e", params(), "params.yaml")
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())   # nothing half written


def test_bad_files_are_refused_naming_them(tmp_path, imported):
    tmp = imported[0]
    data = (tmp / "vae.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match=r"cut.pth: cannot read the VQ-VAE state dict"):
        import_official(tmp_path / "cut.pth", None, tmp_path / "out", params(), "params.yaml")

    class Evil:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))
    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(ArtifactError, match=r"evil.pth: cannot read"):
        import_official(tmp_path / "evil.pth", None, tmp_path / "out", params(), "params.yaml")
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(ArtifactError, match=r"absent.pth: VQ-VAE file not found"):
        import_official(tmp_path / "absent.pth", None, tmp_path / "out", params(), "params.yaml")


def test_paper_profile_has_the_released_shapes():
    """The released files' sizes (shared/notes/official_checkpoints.md): the paper profile's VQ-VAE
    has the 108,948,355 parameters in 323 tensors of vae_ch160v4096z32.pth (its 324th key is the
    usage buffer the importer drops), the d16 transformer the 310,283,520 of var_d16.pth."""
    from pipeline.params import read_params
    from pipeline.tokenizer.config import load_tokenizer_model
    from varcore.vqvae import VQVAE
    with torch.device("meta"):
        vq = VQVAE(load_tokenizer_model(read_params("profiles/paper.yaml"), "profiles/paper.yaml"))
        var = VAR(VARConfig(depth=16))
    assert sum(p.numel() for p in vq.parameters()) == 108_948_355 and len(vq.state_dict()) == 323
    assert sum(p.numel() for p in var.parameters()) == 310_283_520
