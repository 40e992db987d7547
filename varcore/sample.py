"""Scale-by-scale sampling (paper Sec. 3.2) and zero-shot in/out-painting and class editing.

All tokens of one scale are drawn in parallel from the KV-cached transformer.
Classifier-free guidance runs the conditional and the null-class batch together and
mixes the logits as ``(1 + t) l_cond - t l_uncond`` with ``t = cfg * k / (K - 1)``, so
guidance grows from zero at the first scale to ``cfg`` at the last, as in the paper's code.
Zero-shot tasks teacher-force the tokens outside a mask at every scale (paper Sec. 7).
On CUDA the transformer calls run through the static engine (one CUDA graph per scale,
:mod:`varcore.fast.static_sampler`); the tokens are those of the plain KV-cached loop.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import require
from .fast.compile import compile_region
from .fast.static_sampler import static_engine
from .fast.subpixel import decode_with
from .quant import MultiScaleQuantizer
from .var import VAR
from .vqvae import VQVAE


ENGINES = ("auto", "plain", "static", "static_exact")
# cuDNN picks convolution kernels by timing them at the first call of each shape (the VQ-VAE
# decoder and the quantiser's phi convolutions); its heuristic choice for the decoder's
# channels-last bf16 convolutions was markedly slower than the timed choice on Hopper GPUs.
CUDNN_AUTOTUNE = True
# Batches of at most this many images decode through CUDA graphs on CUDA: at one image, launching
# the decoder's kernels took longer than running them (4.9 -> 2.4 ms with graphs on an H200);
# from a few images on the kernels hide the launches, and a graph would keep its activations
# (GBs for 16 images of 256x256) allocated between calls.
DECODE_GRAPH_MAX_IMAGES = 2
# How the compiled decoder runs each nearest 2x upsampling + 3x3 convolution
# (a key of varcore.fast.subpixel.UPSAMPLE_FORMS; all compute the same function).
DECODE_UPSAMPLE = "subpixel"


@contextlib.contextmanager
def cudnn_autotune():
    """Turn on ``cudnn.benchmark`` for the duration (when ``CUDNN_AUTOTUNE``), then restore it."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = before or CUDNN_AUTOTUNE
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


@dataclass(frozen=True)
class SamplingConfig:
    cfg: float = 1.5        # guidance strength at the last scale; 0 disables CFG
    top_k: int = 900        # 0 disables
    top_p: float = 0.96     # 1.0 disables
    engine: str = "auto"    # plain | static | static_exact (uncompiled); auto: static on CUDA

    def __post_init__(self):
        require(self.cfg >= 0, "cfg", f"must be >= 0, got {self.cfg}")
        require(self.engine in ENGINES, "engine", f"must be one of {ENGINES}, got {self.engine!r}")
        require(self.top_k >= 0, "top_k", f"must be >= 0, got {self.top_k}")
        require(0.0 < self.top_p <= 1.0, "top_p", f"must be in (0, 1], got {self.top_p}")


@dataclass
class Teacher:
    """Tokens to keep: ``idx_list[k]`` is taken wherever ``keep_masks[k]`` (``(B, pn, pn)``) is True."""

    idx_list: list[torch.Tensor]
    keep_masks: list[torch.Tensor]


def filter_logits(logits_NV: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k and outside the smallest top-p nucleus to -inf.

    The nucleus is cut from the tail of the top-k-filtered distribution sorted ascending;
    with both filters on, one descending sort serves both (its k-th entry is the top-k
    threshold, its reverse the ascending order), instead of a top-k pass plus a sort.
    """
    use_k = 0 < top_k < logits_NV.shape[-1]
    if top_p >= 1.0:
        if use_k:
            kth = logits_NV.topk(top_k, dim=-1).values[..., -1:]
            logits_NV = logits_NV.masked_fill(logits_NV < kth, float("-inf"))
        return logits_NV
    sorted_desc, order = logits_NV.sort(dim=-1, descending=True)
    if use_k:
        kth = sorted_desc[..., top_k - 1:top_k]
        sorted_desc = sorted_desc.masked_fill(sorted_desc < kth, float("-inf"))
    cum = sorted_desc.flip(-1).softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cum <= (1 - top_p)
    drop_sorted[..., -1] = False  # always keep the most likely token
    drop = drop_sorted.scatter(-1, order.flip(-1), drop_sorted)
    if use_k:
        drop |= logits_NV < kth
    return logits_NV.masked_fill(drop, float("-inf"))


# Logits ranked past the k-th by top-k sampling: the official filter keeps every logit equal to
# the k-th largest, and bf16 logits tie often (about six per bf16 step near the 900th of 4096),
# so the ranking takes this many more and drops those below the k-th value.
TOP_K_TIE_SLACK = 32


def ranked_candidates(logits_NV: torch.Tensor, top_k: int, top_p: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The tokens that top-k and top-p leave, as weights over a ranked list: ``(probs_Nn, idx_Nn)``
    with ``idx_Nn`` the vocabulary index of each column (None: all ``V`` columns in vocabulary
    order); the weights are proportional to the filtered distribution (the softmax before the
    nucleus cut, not renormalised: the draw does not need it) and zero where a filter cut the token.

    The same sets as :func:`filter_logits`, computed without sorting the whole vocabulary when
    top-k is on: one ``topk`` ranks the ``k`` (+ ties) candidates, and the nucleus is the
    shortest run of them from the top whose mass reaches ``top_p`` (a token is kept while the
    mass ranked strictly above it is below ``top_p``, which is :func:`filter_logits`' rule read
    from the other end: it drops from the bottom while the mass at or below is at most ``1 - top_p``).
    Ties with the k-th logit are kept, as there, up to :data:`TOP_K_TIE_SLACK` of them.
    """
    V = logits_NV.shape[-1]
    if 0 < top_k < V:
        vals_Nn, idx_Nn = logits_NV.topk(min(V, top_k + TOP_K_TIE_SLACK), dim=-1)   # sorted, descending
        vals_Nn = vals_Nn.masked_fill(vals_Nn < vals_Nn[:, top_k - 1:top_k], float("-inf"))
    elif top_p < 1.0:
        vals_Nn, idx_Nn = logits_NV.sort(dim=-1, descending=True)
    else:
        return logits_NV.softmax(dim=-1), None
    probs_Nn = vals_Nn.softmax(dim=-1)
    if top_p < 1.0:
        above_Nn = probs_Nn.cumsum(dim=-1) - probs_Nn   # mass ranked above each candidate
        probs_Nn = probs_Nn.masked_fill(above_Nn >= top_p, 0.0)
    return probs_Nn, idx_Nn


def sample_logits(logits_BlV: torch.Tensor, top_k: int, top_p: float,
                  generator: torch.Generator | None) -> torch.Tensor:
    """Draw one token per position: ``(B, l)``.

    The draw is the exponential race: ``argmax_i p_i / q_i`` with ``q_i ~ Exp(1)`` picks ``i``
    with probability ``p_i`` (what ``torch.multinomial`` does for one sample, after two checks
    that wait for the GPU). One ``q`` is drawn per vocabulary entry, in vocabulary order, so a
    generator state gives the tokens ``multinomial`` gives over :func:`filter_logits`' output,
    while the race itself runs over the ranked candidates alone.
    """
    B, l, V = logits_BlV.shape
    logits_NV = logits_BlV.float().reshape(-1, V)
    probs_Nn, idx_Nn = ranked_candidates(logits_NV, top_k, top_p)
    q_NV = torch.empty_like(logits_NV).exponential_(generator=generator)
    q_Nn = q_NV if idx_Nn is None else q_NV.gather(-1, idx_Nn)
    pick_N1 = (probs_Nn / q_Nn).argmax(dim=-1, keepdim=True)
    return (pick_N1 if idx_Nn is None else idx_Nn.gather(-1, pick_N1)).view(B, l)


def guidance(k: int, K: int, cfg: float) -> float:
    """CFG strength at scale index ``k``: linear from 0 to ``cfg``."""
    return cfg * k / (K - 1) if K > 1 else cfg


@torch.no_grad()
@cudnn_autotune()
def sample_tokens(var: VAR, quantizer: MultiScaleQuantizer, label_B: torch.Tensor,
                  sampling: SamplingConfig = SamplingConfig(), generator: torch.Generator | None = None,
                  teacher: Teacher | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Generate K token maps scale by scale; returns them and the final ``f_hat``.

    Deterministic for a given ``generator`` state. With ``teacher``, tokens where its keep
    mask is set are copied instead of sampled, and the copies feed the next scales.
    """
    cfg, pn = var.cfg, quantizer.patch_nums
    var.cfg.check_tokenizer(quantizer.vocab_size, quantizer.Cvae, pn)
    B, K = label_B.shape[0], len(pn)
    use_cfg = sampling.cfg > 0
    labels = torch.cat([label_B, torch.full_like(label_B, cfg.num_classes)]) if use_cfg else label_B
    cond_BC = var.cond(labels)
    forward_scale = scale_forward(var, cond_BC, sampling.engine)
    f_hat = quantizer.embedding.weight.new_zeros(B, quantizer.Cvae, pn[-1], pn[-1])
    x_BlC, idx_list = var.sos(cond_BC), []
    for k, p in enumerate(pn):
        logits_BlV = forward_scale(k, x_BlC)
        if use_cfg:
            t = guidance(k, K, sampling.cfg)
            logits_BlV = (1 + t) * logits_BlV[:B] - t * logits_BlV[B:]
        idx_Bl = sample_logits(logits_BlV, sampling.top_k, sampling.top_p, generator)
        idx_Bhw = idx_Bl.view(B, p, p)
        if teacher is not None:
            idx_Bhw = torch.where(teacher.keep_masks[k], teacher.idx_list[k], idx_Bhw)
        idx_list.append(idx_Bhw)
        f_hat, next_BChw = quantizer.add_scale(k, f_hat, quantizer.lookup(idx_Bhw))
        if next_BChw is not None:
            x_BlC = var.word_embed(next_BChw.flatten(2).transpose(1, 2).to(var.word_embed.weight.dtype))
            if use_cfg:
                x_BlC = x_BlC.repeat(2, 1, 1)
    return idx_list, f_hat


def scale_forward(var: VAR, cond_BC: torch.Tensor, engine: str = "auto"):
    """``f(k, x_BlC) -> float logits of scale k`` for one batch, through a fresh KV cache
    (plain) or the cached static engine (auto on CUDA; an eval-mode model only)."""
    device = cond_BC.device
    if engine.startswith("static") or (engine == "auto" and device.type == "cuda" and not var.training):
        eng = static_engine(var, cond_BC.shape[0], device, False if engine == "static_exact" else None)
        eng.begin(var, cond_BC)
        return eng.scale
    caches, starts = var.new_kv_caches(), var.cfg.layout.starts
    return lambda k, x_BlC: var.forward_scale(x_BlC, cond_BC, starts[k], caches).float()


@torch.no_grad()
def generate(var: VAR, vqvae: VQVAE, label_B: torch.Tensor, sampling: SamplingConfig = SamplingConfig(),
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Class-conditional images ``(B, 3, H, W)`` in [-1, 1]."""
    _, f_hat = sample_tokens(var, vqvae.quantizer, label_B, sampling, generator)
    return decode_images(vqvae, f_hat, compiled=None if sampling.engine == "auto" else False)


def _decode(vqvae: VQVAE, f_hat_BChw: torch.Tensor) -> torch.Tensor:
    return decode_with(vqvae, f_hat_BChw, DECODE_UPSAMPLE)


@torch.no_grad()
@cudnn_autotune()
def decode_images(vqvae: VQVAE, f_hat_BChw: torch.Tensor, chunk: int = 16, compiled: bool | None = None
                  ) -> torch.Tensor:
    """``f_hat -> images``, ``chunk`` images at a time (bounds the decoder's memory at 256x256).
    ``compiled`` (None: on CUDA) runs the decoder through ``torch.compile`` on channels-last
    input, which fuses GroupNorm + SiLU and keeps the convolutions in NHWC, with each
    upsampling + convolution in the form :data:`DECODE_UPSAMPLE` (:mod:`varcore.fast.subpixel`:
    the same function, 16 instead of 36 multiply-adds per output); small batches on CUDA replay
    its kernels as CUDA graphs (:data:`DECODE_GRAPH_MAX_IMAGES`)."""
    cuda = f_hat_BChw.device.type == "cuda"
    if not (cuda if compiled is None else compiled):
        return torch.cat([vqvae.f_hat_to_img(f) for f in f_hat_BChw.split(chunk)])
    graphs = cuda and f_hat_BChw.shape[0] <= DECODE_GRAPH_MAX_IMAGES
    run = compile_region(_decode, graphs=graphs)
    imgs = []
    for f in f_hat_BChw.split(chunk):
        img = run(vqvae, f.contiguous(memory_format=torch.channels_last))
        imgs.append(img.clone() if graphs else img)   # the next replay overwrites a graph's output
    return torch.cat(imgs)


# ---- zero-shot tasks -----------------------------------------------------------------------
def box_mask(B: int, size: int, box: tuple[int, int, int, int], device=None) -> torch.Tensor:
    """Bool ``(B, size, size)`` mask, True inside ``box = (top, left, bottom, right)`` (pixels, end-exclusive)."""
    top, left, bottom, right = box
    require(0 <= top < bottom <= size and 0 <= left < right <= size, "box",
            f"{box} is not inside a {size}x{size} image as (top, left, bottom, right)")
    m = torch.zeros(B, size, size, dtype=torch.bool, device=device)
    m[:, top:bottom, left:right] = True
    return m


def scale_keep_masks(regen_BHW: torch.Tensor, patch_nums: tuple[int, ...], min_cover: float = 0.5
                     ) -> list[torch.Tensor]:
    """Per-scale keep masks ``(B, pn, pn)`` from a region to regenerate (pixel or latent grid).

    A token is regenerated when at least ``min_cover`` of its cell lies in the region, so a
    small hole keeps the coarse, global tokens of the original and regenerates detail.
    """
    m = regen_BHW.float().unsqueeze(1)
    return [F.interpolate(m, size=(p, p), mode="area")[:, 0] < min_cover for p in patch_nums]


@torch.no_grad()
def inpaint(var: VAR, vqvae: VQVAE, img_B3HW: torch.Tensor, regen_BHW: torch.Tensor, label_B: torch.Tensor,
            sampling: SamplingConfig = SamplingConfig(), generator: torch.Generator | None = None,
            min_cover: float = 0.5) -> tuple[torch.Tensor, list[torch.Tensor], Teacher]:
    """Regenerate the region ``regen_BHW`` (True = regenerate) of ``img``, teacher-forcing the rest.

    Returns the images, their token maps, and the teacher that was forced (for inspection).
    """
    teacher = Teacher(vqvae.img_to_idx(img_B3HW), scale_keep_masks(regen_BHW, vqvae.quantizer.patch_nums, min_cover))
    idx_list, f_hat = sample_tokens(var, vqvae.quantizer, label_B, sampling, generator, teacher)
    return vqvae.f_hat_to_img(f_hat), idx_list, teacher


@torch.no_grad()
def outpaint(var: VAR, vqvae: VQVAE, img_B3HW: torch.Tensor, keep_BHW: torch.Tensor, label_B: torch.Tensor,
             sampling: SamplingConfig = SamplingConfig(), generator: torch.Generator | None = None,
             min_cover: float = 0.5) -> tuple[torch.Tensor, list[torch.Tensor], Teacher]:
    """Keep the region ``keep_BHW`` of ``img`` and generate everything around it."""
    return inpaint(var, vqvae, img_B3HW, ~keep_BHW, label_B, sampling, generator, min_cover)


@torch.no_grad()
def edit_class(var: VAR, vqvae: VQVAE, img_B3HW: torch.Tensor, box: tuple[int, int, int, int],
               new_label_B: torch.Tensor, sampling: SamplingConfig = SamplingConfig(),
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, list[torch.Tensor], Teacher]:
    """Class-conditional editing: regenerate inside ``box`` under ``new_label``, keep the rest."""
    regen = box_mask(img_B3HW.shape[0], img_B3HW.shape[-1], box, img_B3HW.device)
    return inpaint(var, vqvae, img_B3HW, regen, new_label_B, sampling, generator)
