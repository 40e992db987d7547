"""Parity of imported official checkpoints: the official model's state dict, imported with
``pipeline.official_import``, computes the official function in varcore.

    PYTHONPATH=. python benchmarks/official_parity.py --official-root PATH/TO/VAR --depth 2 --depth 16

``--official-root`` is a checkout of FoundationVision/VAR (not shipped with varscale). On CPU in
float32 the program builds the official VQ-VAE (the released layout: ch 160, V 4096, Cvae 32, 4
shared phi, the 10 paper scales, 256x256 images) and the official VAR of each depth with random
weights at ordinary magnitudes (the official init, then N(0, 0.02) noise on every tensor, so that
no block is a near-identity), saves their state dicts as the released files are saved, imports
them with ``profiles/paper.yaml`` and compares, one JSON line per check:

- ``vae``: the tokens of random images (all K scales, exact), the decoder's images from the same
  ``f_hat`` and the images decoded from the tokens (max |diff| <= 1e-5);
- ``teacher_forcing``: the transformer's inputs built from the tokens and the logits of the
  teacher-forced forward pass (max |diff| <= 1e-5, relative to the logits' scale when > 1; the
  official forward drops 10% of the labels even in eval mode, so its drop rate is set to 0);
- ``sampling``: the sampled tokens of every scale (exact) and the images with CFG 1.5 and top-k 1
  (official ``autoregressive_infer_cfg(g_seed=...)`` against ``varcore.sample_tokens``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_utils import emit, env  # noqa: E402
from official_step import official_var_class  # noqa: E402

from pipeline.official_import import import_official  # noqa: E402
from pipeline.params import read_params  # noqa: E402
from pipeline.tokenizer.checkpoint import load_tokenizer  # noqa: E402
from pipeline.training.checkpoint import load_var  # noqa: E402
from varcore import PAPER_PATCH_NUMS  # noqa: E402
from varcore.sample import SamplingConfig, decode_images, sample_tokens  # noqa: E402

TOL = 1e-5
PROFILE = Path(__file__).resolve().parents[1] / "profiles" / "paper.yaml"


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def scaled_tol(ref: torch.Tensor) -> float:
    """1e-5 absolute, or relative to the tensor's largest magnitude when that exceeds 1 (float32
    keeps ~7 digits: logits of size 30 cannot agree to 1e-5 absolute after different op orders)."""
    return TOL * max(1.0, ref.abs().max().item())


@torch.no_grad()
def noisy(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def official_vae(root: Path):
    VQVAE = importlib.import_module("models.vqvae").VQVAE
    torch.manual_seed(0)
    with contextlib.redirect_stdout(sys.stderr):
        vae = VQVAE(vocab_size=4096, z_channels=32, ch=160, test_mode=True, share_quant_resi=4,
                    v_patch_nums=PAPER_PATCH_NUMS)
    return noisy(vae, 1).eval()


def official_var(VAR, vae, depth: int, shared_aln: bool):
    torch.manual_seed(depth)
    with contextlib.redirect_stdout(sys.stderr):
        var = VAR(vae_local=vae, num_classes=1000, depth=depth, embed_dim=64 * depth, num_heads=depth,
                  mlp_ratio=4.0, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.1 * depth / 24, norm_eps=1e-6,
                  shared_aln=shared_aln, cond_drop_rate=0.1, attn_l2_norm=True, patch_nums=PAPER_PATCH_NUMS,
                  flash_if_available=False, fused_if_available=False)
        var.init_weights(init_adaln=0.5, init_adaln_gamma=1e-5, init_head=0.02, init_std=-1)
    return noisy(var, 2 + depth).eval()


@torch.no_grad()
def check_vae(off, vq, img: torch.Tensor) -> tuple[dict, list[torch.Tensor]]:
    off_idx = off.img_to_idxBl(img)                                   # K x (B, pn^2)
    ours = [t.flatten(1) for t in vq.img_to_idx(img)]
    tokens_equal = all(torch.equal(a, b) for a, b in zip(off_idx, ours))
    f = off.quant_conv(off.encoder(img))
    f_hat = off.quantize.f_to_idxBl_or_fhat(f, to_fhat=True)[-1]
    dec = max_diff(off.fhat_to_img(f_hat), vq.f_hat_to_img(f_hat))
    from_tokens = max_diff(off.idxBl_to_img(off_idx, same_shape=True, last_one=True),
                           vq.idx_to_img(vq.quantizer.split_tokens(torch.cat(off_idx, 1))))
    enc = max_diff(f, vq.encode(img))
    rec = {"check": "vae", "tokens_equal": tokens_equal,
           "tokens_equal_per_scale": [bool(torch.equal(a, b)) for a, b in zip(off_idx, ours)],
           "max_abs_diff_latent": enc, "max_abs_diff_decode": dec, "max_abs_diff_tokens_to_image": from_tokens}
    rec["pass"] = tokens_equal and dec <= TOL and from_tokens <= TOL
    return rec, off_idx


@torch.no_grad()
def check_teacher_forcing(off_vae, off_var, vq, var, off_idx, label_B) -> dict:
    x_off = off_vae.quantize.idxBl_to_var_input(off_idx)
    x_ours = vq.quantizer.idx_to_var_input(vq.quantizer.split_tokens(torch.cat(off_idx, 1)))
    # the official forward is its training forward: it replaces each label by the unconditional
    # class with probability cond_drop_rate even in eval mode; compare without that dropout
    off_var.cond_drop_rate = 0.0
    logits_off = off_var(label_B, x_off)
    logits_ours = var(label_B, x_off)
    d_in, d_logits = max_diff(x_off, x_ours), max_diff(logits_off, logits_ours)
    return {"check": "teacher_forcing", "max_abs_diff_input": d_in, "max_abs_diff_logits": d_logits,
            "logits_abs_max": logits_off.abs().max().item(),
            "pass": d_in <= TOL and d_logits <= scaled_tol(logits_off)}


@torch.no_grad()
def check_sampling(off_var, vq, var, label_B, seed: int, cfg: float) -> dict:
    taken: list[torch.Tensor] = []
    emb = off_var.vae_quant_proxy[0].embedding
    hook = emb.register_forward_hook(lambda m, args, out: taken.append(args[0].clone()))
    try:
        img_off = off_var.autoregressive_infer_cfg(label_B.shape[0], label_B, g_seed=seed, cfg=cfg, top_k=1,
                                                    top_p=0.0, more_smooth=False)
    finally:
        hook.remove()
    idx_list, f_hat = sample_tokens(var, vq.quantizer, label_B, SamplingConfig(cfg=cfg, top_k=1, top_p=1.0,
                                    engine="plain"), torch.Generator().manual_seed(seed))
    img_ours = decode_images(vq, f_hat, compiled=False).add(1).mul(0.5)
    per_scale = [bool(torch.equal(a.flatten(1), b)) for a, b in zip(idx_list, taken)]
    d_img = max_diff(img_off, img_ours)
    return {"check": "sampling", "cfg": cfg, "top_k": 1, "seed": seed, "tokens_equal_per_scale": per_scale,
            "max_abs_diff_image": d_img, "pass": all(per_scale) and len(taken) == len(idx_list) and d_img <= TOL}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official-root", type=Path, required=True, help="checkout of FoundationVision/VAR")
    ap.add_argument("--depth", type=int, action="append", default=[], help="default: 2")
    ap.add_argument("--shared-aln", action="store_true", help="the d36 layout (one shared AdaLN projection)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--import-only", type=Path, metavar="DIR",
                    help="only write the imported files of the (first) depth to DIR (for benchmarks/sample.py --model)")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    VAR = official_var_class(args.official_root.resolve(), torch.device("cpu"))
    off_vae = official_vae(args.official_root)
    img = torch.rand(args.batch, 3, 256, 256, generator=torch.Generator().manual_seed(args.seed)) * 2 - 1
    label_B = torch.arange(args.batch) * 7 % 1000
    if args.import_only:
        depth = (args.depth or [2])[0]
        args.import_only.mkdir(parents=True, exist_ok=True)
        torch.save(off_vae.state_dict(), args.import_only / "vae.pth")
        torch.save(official_var(VAR, off_vae, depth, args.shared_aln).state_dict(), args.import_only / "var.pth")
        emit({"bench": "official_import", **import_official(args.import_only / "vae.pth", args.import_only / "var.pth",
                                                            args.import_only, read_params(PROFILE), str(PROFILE))})
        return 0
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.save(off_vae.state_dict(), tmp / "vae_ch160v4096z32.pth")
        for depth in args.depth or [2]:
            off_var = official_var(VAR, off_vae, depth, args.shared_aln)
            torch.save(off_var.state_dict(), tmp / f"var_d{depth}.pth")
            import_official(tmp / "vae_ch160v4096z32.pth", tmp / f"var_d{depth}.pth", tmp / "out",
                            read_params(PROFILE), str(PROFILE))
            vq = load_tokenizer(tmp / "out" / "tokenizer.pt")
            var, _ = load_var(tmp / "out" / f"var-d{depth}.pt")
            head = {"bench": "official_parity", "depth": depth, "shared_aln": args.shared_aln, "batch": args.batch,
                    "dtype": "float32", **env()}
            rec, off_idx = check_vae(off_vae, vq, img)
            for r in (rec, check_teacher_forcing(off_vae, off_var, vq, var, off_idx, label_B),
                      check_sampling(off_var, vq, var, label_B, args.seed, 1.5)):
                emit({**head, **r})
                ok &= r["pass"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
