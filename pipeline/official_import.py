"""Import the released checkpoints of the official VAR code as varscale model files.

    python -m pipeline.official_import --vae vae_ch160v4096z32.pth --var var_d16.pth --out imported/

The official files (FoundationVision/VAR: ``vae_ch160v4096z32.pth``, ``var_d{16,20,24,30}.pth``,
``var_d36.pth``) are plain state dicts. This command renames their keys to varcore's, drops the
buffers varcore computes itself, checks every key and shape against the models that the params
file describes (``profiles/paper.yaml`` by default: its tokenizer section holds the official
VQ-VAE's layout), and writes ``tokenizer.pt`` and ``var-d{D}.pt`` in the format the stages read
(``evaluate`` included). The depth, the class count and the AdaLN layout are read from the VAR
file; everything else must match the params, and the first key that does not stops the import
with both shapes. Both files are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn

from varcore.var import VAR
from varcore.vqvae import VQVAE, AttnBlock, Downsample, ResBlock, Upsample

from .errors import ArtifactError, ParamsError
from .files import sha256_file
from .params import read_params
from .tokenizer.checkpoint import save_tokenizer
from .tokenizer.config import load_tokenizer_model
from .training.checkpoint import save_var
from .training.config import load_train_var_config

log = logging.getLogger(__name__)

DEFAULT_PARAMS = "profiles/paper.yaml"
# official VAR buffers that varcore derives from the config instead of storing
VAR_DROPPED = re.compile(r"^(lvl_1L|attn_bias_for_masking)$|\.attn\.zero_k_bias$")
VAE_DROPPED = re.compile(r"^quantize\.ema_vocab_hit_SV$")

# submodule names inside one block: varcore's -> official's
RESBLOCK_NAMES = {"net.0": "norm1", "net.2": "conv1", "net.3": "norm2", "net.6": "conv2", "skip": "nin_shortcut"}
ATTN_NAMES = {"norm": "norm", "qkv": "qkv", "proj": "proj_out"}


def var_key(official: str) -> str | None:
    """The varcore name of an official VAR key; ``None`` for a buffer varcore computes itself."""
    if VAR_DROPPED.search(official):
        return None
    if official.startswith("head_nm."):
        return "head." + official[len("head_nm."):]
    if official.startswith("head."):
        return "head.head." + official[len("head."):]
    return official.replace(".attn.mat_qkv.", ".attn.qkv.").replace(".ada_gss", ".ada_offset_116C")


def _stack_prefixes(net: nn.Sequential, stack: str, num_levels: int) -> Iterator[tuple[str, str, nn.Module]]:
    """(varcore prefix, official prefix, module) for every layer of an encoder or decoder stack.

    varcore keeps each stack as one ``nn.Sequential`` in forward order; the official code
    groups it as ``conv_in``, ``down[level]`` / ``up[level]`` with ``block[j]``, ``attn[j]`` and
    ``downsample`` / ``upsample``, ``mid`` and ``norm_out``, ``conv_out``."""
    encoder = stack == "encoder"
    level, block = (0 if encoder else num_levels - 1), 0
    group = "down" if encoder else "up"
    for i, m in enumerate(net):
        vc = f"{stack}.net.{i}"
        if isinstance(m, nn.Sequential):          # the bottleneck: res, attn (or identity), res
            for j, name in enumerate(("block_1", "attn_1", "block_2")):
                yield f"{vc}.{j}", f"{stack}.mid.{name}", m[j]
        elif isinstance(m, ResBlock):
            yield vc, f"{stack}.{group}.{level}.block.{block}", m
            block += 1
        elif isinstance(m, AttnBlock):
            yield vc, f"{stack}.{group}.{level}.attn.{block - 1}", m
        elif isinstance(m, (Downsample, Upsample)):
            yield vc, f"{stack}.{group}.{level}.{'downsample' if encoder else 'upsample'}", m
            level, block = level + (1 if encoder else -1), 0
        elif isinstance(m, nn.GroupNorm):
            yield vc, f"{stack}.norm_out", m
        elif isinstance(m, nn.Conv2d):            # the stack's first and last layers
            yield vc, f"{stack}.{'conv_in' if i == 0 else 'conv_out'}", m


def _leaf_names(m: nn.Module) -> dict[str, str]:
    """varcore -> official names of one layer's tensors, relative to the layer."""
    if isinstance(m, ResBlock):
        sub = RESBLOCK_NAMES
    elif isinstance(m, AttnBlock):
        sub = ATTN_NAMES
    elif isinstance(m, Downsample):               # a Conv2d subclass here, `downsample.conv` there
        return {k: f"conv.{k}" for k in m.state_dict()}
    else:
        sub = None
    out = {}
    for k in m.state_dict():
        head, _, leaf = k.rpartition(".")
        out[k] = f"{sub[head]}.{leaf}" if sub is not None else k
    return out


def vae_key_map(vqvae: VQVAE) -> dict[str, str]:
    """official key -> varcore key for every tensor of ``vqvae``."""
    n = len(vqvae.cfg.ch_mult)
    out = {}
    for stack in ("encoder", "decoder"):
        for vc, off, m in _stack_prefixes(getattr(vqvae, stack).net, stack, n):
            for vk, ok in _leaf_names(m).items():
                out[f"{off}.{ok}"] = f"{vc}.{vk}"
    for conv in ("quant_conv", "post_quant_conv"):
        for leaf in ("weight", "bias"):
            out[f"{conv}.{leaf}"] = f"{conv}.{leaf}"
    out["quantize.embedding.weight"] = "quantizer.embedding.weight"
    return out


# the official code names its phi convs by how they are shared: one (`qresi`), partially shared
# (`qresi_ls.j`) or one per scale (`j`); all pick the conv per scale by the same rule
PHI_KEY = re.compile(r"^quantize\.quant_resi\.(?:qresi_ls\.(\d+)|(\d+)|qresi)\.(weight|bias)$")


def vae_key(key_map: dict[str, str], official: str) -> str | None:
    """The varcore name of an official VQ-VAE key (``None``: dropped; unknown keys stay as they are)."""
    if VAE_DROPPED.search(official):
        return None
    if m := PHI_KEY.match(official):
        return f"quantizer.phis.{m.group(1) or m.group(2) or 0}.{m.group(3)}"
    return key_map.get(official, official)


def convert(official: dict[str, torch.Tensor], key_of, model: nn.Module, file: Path, what: str
            ) -> dict[str, torch.Tensor]:
    """Rename ``official`` with ``key_of`` (None: dropped) and check it against ``model``'s state dict:
    every key present, none left over, every shape equal. The first mismatch raises naming it."""
    expected = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for k, t in official.items():
        if not isinstance(t, torch.Tensor):
            raise ArtifactError(f"{file}: {k} is a {type(t).__name__}, not a tensor (not an official {what} state dict)")
        vk = key_of(k)
        if vk is None:
            continue
        if vk not in expected:
            raise ArtifactError(f"{file}: key {k} (varscale {vk}) has no place in the {what} the params describe "
                                f"(another layout?)")
        if tuple(t.shape) != tuple(expected[vk].shape):
            raise ArtifactError(f"{file}: key {k} has shape {tuple(t.shape)}, the {what} the params describe "
                                f"expects {tuple(expected[vk].shape)} for {vk} (another depth, vocabulary or layout?)")
        out[vk] = t.to(expected[vk].dtype)
    missing = [k for k in expected if k not in out]
    if missing:
        raise ArtifactError(f"{file}: no tensor for {missing[0]} ({len(missing)} missing; another layout?)")
    return out


def read_state_dict(path: Path, what: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ArtifactError(f"{path}: {what} file not found")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # truncated, corrupt or code-carrying files
        raise ArtifactError(f"{path}: cannot read the {what} state dict: {str(e).splitlines()[0]}") from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not sd:
        raise ArtifactError(f"{path}: not a state dict (a dict of tensors)")
    return sd


def var_layout(sd: dict[str, torch.Tensor], path: Path) -> dict[str, Any]:
    """Depth, class count and AdaLN sharing of an official VAR state dict."""
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not blocks or "class_emb.weight" not in sd:
        raise ArtifactError(f"{path}: no blocks.N.* or class_emb.weight: not an official VAR state dict")
    return {"depth": max(blocks) + 1, "num_classes": sd["class_emb.weight"].shape[0] - 1,
            "shared_aln": "shared_ada_lin.1.weight" in sd}


def import_official(vae: Path, var: Path | None, out: Path, params: dict[str, Any], params_file: str,
                    depth: int | None = None) -> dict[str, Any]:
    """Write ``out/tokenizer.pt`` (and ``out/var-d{D}.pt``) once both files passed every check;
    returns what was written."""
    vqvae = VQVAE(load_tokenizer_model(params, params_file))
    key_map = vae_key_map(vqvae)
    vqvae.load_state_dict(convert(read_state_dict(vae, "VQ-VAE"), lambda k: vae_key(key_map, k), vqvae, vae,
                                  "VQ-VAE"))
    model = None
    if var is not None:
        sd = read_state_dict(var, "VAR")
        layout = var_layout(sd, var)
        if depth is not None and depth != layout["depth"]:
            raise ArtifactError(f"{var}: holds {layout['depth']} blocks, not --depth {depth}")
        cfg = load_train_var_config(params, params_file, layout["depth"]).var_config(layout["num_classes"])
        if cfg.shared_aln != layout["shared_aln"]:   # the released d36 shares its AdaLN, the others do not
            cfg = dataclasses.replace(cfg, shared_aln=layout["shared_aln"])
        model = VAR(cfg)
        model.load_state_dict(convert(sd, var_key, model, var, f"depth-{cfg.depth} VAR"))
    out.mkdir(parents=True, exist_ok=True)
    tok_path = out / "tokenizer.pt"
    save_tokenizer(tok_path, vqvae, {"imported_from": vae.name, "source_sha256": sha256_file(vae)})
    log.info("%s -> %s (%s)", vae, tok_path, vqvae.cfg)
    written = {"tokenizer": str(tok_path)}
    if model is not None:
        var_path = out / f"var-d{model.cfg.depth}.pt"
        save_var(var_path, model, extra={"tokenizer_sha256": sha256_file(tok_path), "imported_from": var.name,
                                         "source_sha256": sha256_file(var)})
        log.info("%s -> %s (depth %d, %d classes, shared AdaLN %s)", var, var_path, model.cfg.depth,
                 model.cfg.num_classes, model.cfg.shared_aln)
        written["var"] = str(var_path)
    return written


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vae", type=Path, required=True, help="the official VQ-VAE, e.g. vae_ch160v4096z32.pth")
    ap.add_argument("--var", type=Path, default=None, help="an official transformer, e.g. var_d16.pth")
    ap.add_argument("--out", type=Path, required=True, help="folder for tokenizer.pt and var-dD.pt")
    ap.add_argument("--params", default=DEFAULT_PARAMS, help="the profile whose tokenizer layout the files have")
    ap.add_argument("--depth", type=int, default=None, help="check that the VAR file has this depth")
    args = ap.parse_args(argv)
    from .stage import run_cli, setup_logging   # (MLflow comes with it: not needed by the import itself)
    setup_logging()

    def run() -> dict[str, Any]:
        params = read_params(args.params)
        if "tokenizer" not in params:
            raise ParamsError(f"{args.params}: no tokenizer section")
        return import_official(args.vae, args.var, args.out, params, args.params, args.depth)
    run_cli("import_official", run)


if __name__ == "__main__":
    main()
