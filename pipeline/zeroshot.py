"""``varscale``: class-conditional samples and the paper's zero-shot tasks from the command line.

    varscale generate --depth 4 --out samples.png                       # a grid, one row per class
    varscale inpaint  --depth 4 --image in.png --box 8,8,24,24 --class Sneaker --out filled.png
    varscale outpaint --depth 4 --image in.png --box 8,8,24,24 --out wider.png
    varscale edit     --depth 4 --image in.png --box 0,0,16,32 --class Bag --out edited.png

The model is ``models/var-d{D}.pt`` (``--depth``) or any VAR file (``--model``), with the
tokenizer it was trained on (``--tokenizer``, default ``models/tokenizer.pt``; a model of
another tokenizer is refused). In-painting regenerates the tokens of the region and
teacher-forces every other token at every scale (Alg. 2 with the known tokens kept), so the
rest of the image is kept as the tokenizer reconstructs it; out-painting keeps the region and
generates around it; editing regenerates a box under a new class. Regions come from ``--box
top,left,bottom,right`` (pixels of the input, end-exclusive) or ``--mask`` (a PNG of the input's
size, black and white: white = the region). Images of another size than the model's are resized
to it and the result back to the input's size. Seeds and sampling settings are flags (defaults:
``evaluate.sampling`` of ``--params``) and are written into the output PNG's metadata.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

import numpy as np
import torch

from varcore.sample import SamplingConfig, inpaint, outpaint

from .errors import InputError
from .evaluation.config import SamplingParams
from .evaluation.samples import autocast, sample_images
from .images import grid, save_png, to_uint8_images
from .params import load, read_params, resolve_device
from .stage import run_cli, setup_logging
from .tokenizer.checkpoint import load_tokenizer
from .training.checkpoint import check_fits, load_var

log = logging.getLogger(__name__)
UNCONDITIONAL = "none"


class ArgumentError(InputError):
    """A bad command-line value; the message names the flag."""


# ---- inputs ------------------------------------------------------------------------------------------
def open_picture(path: Path, flag: str, mode: str) -> np.ndarray:
    """The picture at ``path`` as uint8 in PIL ``mode`` ("RGB": ``(H, W, 3)``, "L": ``(H, W)``)."""
    from PIL import Image, UnidentifiedImageError
    if not path.is_file():
        raise ArgumentError(f"{flag} {path}: not found")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert(mode))
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ArgumentError(f"{flag} {path}: cannot read it as an image ({e})") from e


def read_image(path: Path) -> np.ndarray:
    """uint8 ``(H, W, 3)`` RGB; square images only (the model is square)."""
    arr = open_picture(path, "--image", "RGB")
    if arr.shape[0] != arr.shape[1]:
        raise ArgumentError(f"--image {path}: {arr.shape[1]}x{arr.shape[0]} is not square")
    return arr


def read_mask(path: Path, size: int) -> np.ndarray:
    """bool ``(size, size)``, True where the PNG is white; refuses other sizes, grey levels and empty masks."""
    m = open_picture(path, "--mask", "L")
    if m.shape != (size, size):
        raise ArgumentError(f"--mask {path}: {m.shape[1]}x{m.shape[0]}, the image is {size}x{size}")
    values = set(np.unique(m).tolist())
    if not values <= {0, 255}:
        raise ArgumentError(f"--mask {path}: not black and white (values {sorted(values - {0, 255})[:5]} besides "
                            f"0 and 255)")
    if 255 not in values:
        raise ArgumentError(f"--mask {path}: empty (no white pixel)")
    return m == 255


def parse_box(text: str, size: int) -> tuple[int, int, int, int]:
    try:
        box = tuple(int(v) for v in text.split(","))
    except ValueError:
        box = ()
    if len(box) != 4:
        raise ArgumentError(f"--box {text}: expected top,left,bottom,right (4 integers)")
    top, left, bottom, right = box
    if not (0 <= top < bottom <= size and 0 <= left < right <= size):
        raise ArgumentError(f"--box {text}: not inside the {size}x{size} image as top,left,bottom,right "
                            f"(end-exclusive, non-empty)")
    return box


def region(args: argparse.Namespace, size: int) -> np.ndarray:
    """bool ``(size, size)`` from ``--mask`` or ``--box`` (exactly one)."""
    if (args.mask is None) == (args.box is None):
        raise ArgumentError("give exactly one of --mask and --box")
    if args.mask is not None:
        return read_mask(args.mask, size)
    top, left, bottom, right = parse_box(args.box, size)
    m = np.zeros((size, size), bool)
    m[top:bottom, left:right] = True
    return m


def class_id(text: str | None, names: list[str], num_classes: int, flag: str = "--class") -> int:
    """A class by id or name; ``None`` or ``none``: the unconditional class (id ``num_classes``)."""
    if text is None or text.lower() == UNCONDITIONAL:
        return num_classes
    if text.lstrip("-").isdigit():
        i = int(text)
        if not 0 <= i < num_classes:
            raise ArgumentError(f"{flag} {text}: class ids are 0..{num_classes - 1}")
        return i
    lower = [n.lower() for n in names]
    if text.lower() not in lower:
        raise ArgumentError(f"{flag} {text!r}: not a class name of this model; names: {', '.join(names) or '(none saved)'}"
                            f"; or an id 0..{num_classes - 1}")
    return lower.index(text.lower())


# ---- model -------------------------------------------------------------------------------------------
def load_models(args: argparse.Namespace, device: torch.device):
    model = args.model or Path(f"models/var-d{args.depth}.pt")
    if args.model is None and args.depth is None:
        raise ArgumentError("give --depth D (models/var-dD.pt) or --model PATH")
    if not Path(model).is_file():
        raise ArgumentError(f"{'--model' if args.model else '--depth'} {args.model or args.depth}: {model} not found "
                            f"(train it with `dvc repro train_var@{args.depth or 'D'}`)")
    var, meta = load_var(model, map_location=device)
    vq = load_tokenizer(args.tokenizer, map_location=device)
    check_fits(var, meta, vq, model, args.tokenizer)
    return var, vq, meta, Path(model)


def sampling_of(args: argparse.Namespace) -> SamplingParams:
    """The flags over ``evaluate.sampling`` of ``--params`` (the settings the evaluation samples with)."""
    base = SamplingParams()
    if args.params.is_file():
        params = read_params(args.params)
        if "evaluate" in params:
            base = load(SamplingParams, params, "evaluate.sampling", str(args.params))
    try:
        return dataclasses.replace(base, **{k: getattr(args, k) for k in ("cfg", "top_k", "top_p")
                                            if getattr(args, k) is not None})
    except ValueError as e:
        raise ArgumentError(f"sampling flags: {e}") from e


def to_model_size(img_HW3: np.ndarray, size: int) -> torch.Tensor:
    """uint8 ``(H, W, 3)`` -> float ``(1, 3, size, size)`` in [-1, 1] (bicubic resize when needed)."""
    x = torch.from_numpy(img_HW3.copy()).permute(2, 0, 1)[None].float()
    if x.shape[-1] != size:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", antialias=True)
    return x.div(127.5).sub(1).clamp(-1, 1)


def to_input_size(img_B3SS: torch.Tensor, size: int) -> torch.Tensor:
    """float ``(B, 3, S, S)`` in [-1, 1] -> uint8 ``(B, 3, size, size)``."""
    if img_B3SS.shape[-1] != size:
        img_B3SS = torch.nn.functional.interpolate(img_B3SS.float(), size=(size, size), mode="bicubic",
                                                   antialias=True)
    return to_uint8_images(img_B3SS.clamp(-1, 1))


def mask_to_model_size(m_HW: np.ndarray, size: int) -> torch.Tensor:
    """bool ``(size, size)``: a pixel of the model's grid is in the region when half its area is."""
    t = torch.from_numpy(m_HW)
    if t.shape[-1] == size:
        return t
    return torch.nn.functional.interpolate(t[None, None].float(), size=(size, size), mode="area")[0, 0] >= 0.5


# ---- commands ----------------------------------------------------------------------------------------
def cmd_generate(args, var, vq, meta, sampling, device) -> tuple[np.ndarray, dict[str, str]]:
    names = list(meta.get("class_names") or [])
    classes = ([class_id(c.strip(), names, var.cfg.num_classes, "--classes") for c in args.classes.split(",")]
               if args.classes else list(range(var.cfg.num_classes)))
    labels = torch.tensor(classes).repeat_interleave(args.per_class)
    # batch by batch from one seeded generator, as the evaluate stage samples
    img = sample_images(var, vq, labels, sampling, args.seed, args.batch_size, desc="generate")
    rows = img.view(len(classes), args.per_class, *img.shape[1:])
    return grid(list(rows)), {"varscale.classes": ",".join(map(str, classes)),
                              "varscale.per_class": str(args.per_class)}


def cmd_zero_shot(args, var, vq, meta, sampling, device) -> tuple[np.ndarray, dict[str, str]]:
    if args.command == "edit" and (args.box is None or args.mask is not None):
        raise ArgumentError("edit takes --box top,left,bottom,right (the region to redraw)")
    if args.command == "edit" and args.label is None:
        raise ArgumentError("edit needs --class (the new class of the box)")
    img = read_image(args.image)
    size, S = img.shape[0], vq.cfg.image_size
    m = region(args, size)
    label = class_id(args.label, list(meta.get("class_names") or []), var.cfg.num_classes)
    region_1SS = mask_to_model_size(m, S).to(device)[None]
    if not region_1SS.any():
        raise ArgumentError(f"the region ({'--mask' if args.mask else '--box'}) covers no pixel at the model's "
                            f"{S}x{S} resolution")
    x = to_model_size(img, S).to(device)
    label_B = torch.tensor([label], device=device)
    # edit is in-painting of the box under the new class (varcore.sample.edit_class on a pixel box)
    task = outpaint if args.command == "outpaint" else inpaint
    gen = torch.Generator(device=device).manual_seed(args.seed)
    with autocast(device):
        out, _, _ = task(var, vq, x, region_1SS, label_B, SamplingConfig(**dataclasses.asdict(sampling)), gen)
    result = to_input_size(out, size)[0].permute(1, 2, 0).numpy()
    return result, {"varscale.image": str(args.image), "varscale.region": args.box or str(args.mask),
                    "varscale.class": str(label)}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="varscale", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    for name, help_ in (("generate", "class-conditional samples: a grid, one row per class"),
                        ("inpaint", "regenerate the region (white / the box), keep the rest"),
                        ("outpaint", "keep the region (white / the box), generate the rest"),
                        ("edit", "regenerate a box under a new class")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--depth", type=int, help="use models/var-dD.pt")
        p.add_argument("--model", type=Path, help="a VAR file (instead of --depth)")
        p.add_argument("--tokenizer", type=Path, default=Path("models/tokenizer.pt"))
        p.add_argument("--params", type=Path, default=Path("params.yaml"), help="default sampling settings")
        p.add_argument("--out", type=Path, required=True, help="the PNG to write")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--cfg", type=float, help="guidance at the last scale (0: off)")
        p.add_argument("--top-k", type=int, help="0: off")
        p.add_argument("--top-p", type=float, help="1.0: off")
        p.add_argument("--device", default="cpu")
        if name == "generate":
            p.add_argument("--classes", help="comma-separated names or ids (default: all)")
            p.add_argument("--per-class", type=int, default=4)
            p.add_argument("--batch-size", type=int, default=64, help="images sampled at once")
        else:
            p.add_argument("--image", type=Path, required=True)
            p.add_argument("--box", help="top,left,bottom,right in pixels of the input (end-exclusive)")
            p.add_argument("--mask", type=Path, help="PNG of the input's size, white = the region")
            p.add_argument("--class", dest="label", help=f"name or id ({UNCONDITIONAL!r}: unconditional)")
    return ap


def run(args: argparse.Namespace) -> Path:
    device = resolve_device(args.device)
    sampling = sampling_of(args)
    var, vq, meta, model = load_models(args, device)
    body = cmd_generate if args.command == "generate" else cmd_zero_shot
    with torch.no_grad():
        picture, text = body(args, var, vq, meta, sampling, device)
    text = {"varscale.command": args.command, "varscale.model": str(model), "varscale.seed": str(args.seed),
            "varscale.sampling": str(dataclasses.asdict(sampling)), **text}
    save_png(args.out, picture, text)
    log.info("%s -> %s (%dx%d)", args.command, args.out, picture.shape[1], picture.shape[0])
    return args.out


def main(argv: list[str] | None = None) -> None:
    """The console script (returns None: its wrapper passes the return value to ``sys.exit``)."""
    args = parser().parse_args(argv)
    setup_logging()
    run_cli(f"varscale {args.command}", lambda: run(args))


if __name__ == "__main__":
    main()
