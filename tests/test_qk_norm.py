"""The training q/k normalisation kernels compute the attention's cosine-normalised heads, forward
and backward.

The Triton kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set before Triton is
imported, so in a child process), called through the registered op with autograd, so the op's
saved tensors and gradient wiring are checked with the kernels. Float32 inputs are compared with
float64 under bounds derived from the kernels' float32 arithmetic (:func:`_bounds`); a bf16 run
checks the dtypes, with one bf16 step (``2^-7`` relative: the interpreter truncates where the GPU
rounds to nearest) more per stored rounding; it keeps the biases and temperatures in float32, as
training without master weights does. Shapes: 3 heads of 24 dims (neither a power of two, so heads
and dims are masked), 2 images of 37 tokens (74 tokens: the backward's last program is partial
under :data:`varcore.fast.qk_norm.KERNEL_CONFIG`, 16 tokens per program, and both kernels' last
programs under the child's other tiles, 5 and 7). One token's key is all zeros and another's is
nonzero but shorter than ``EPS``, so ``F.normalize``'s floor on the norm is taken there. The child
also runs the kernels under other tiles with the incoming gradients in three layouts the
attention's backward may write (strided reads), and :func:`varcore.fast.qk_norm.fused_qkv_heads`
on a module, against the module's own ``qkv_heads`` in float64.
"""

import pytest
import torch
import torch.nn.functional as F

from tests.interpreted import assert_within, run_child
from varcore.fast import qk_norm
from varcore.var import SelfAttention, VARConfig

B, L, H, HD = 2, 37, 3, 24
C, N = H * HD, B * L
ZERO_K = (1, 5)   # (image, token) whose key is zero
TINY_K = (0, 9)   # (image, token) whose key, and first query head, are shorter than EPS
SMALL_K = (1, 20)   # (image, token) whose key is short (1e-10) but longer than EPS
RADIAL = (0, 30)    # (image, token) whose incoming q and k gradients are mostly along q and k
WRAP = dict(depth=2, num_heads=8)   # the module of the wrapper's check: C = 128, 8 heads of 16
U32, STEP = 2.0 ** -24, 2.0 ** -7

_CHILD = """
import os, sys
os.environ["TRITON_INTERPRET"] = "1"
import torch
from varcore.fast import qk_norm   # registers the ops
a = torch.load(sys.argv[1], weights_only=True)
out = {}
for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
    qkv = a["qkv"].to(dt, copy=True).requires_grad_()
    q_bias, v_bias, temp = (a[k].clone().requires_grad_() for k in ("q_bias", "v_bias", "temp"))
    q, k, v, _ = torch.ops.varscale.qkv_norm_fwd(qkv, q_bias, v_bias, temp, qk_norm.EPS)
    torch.autograd.backward([q, k, v], [a[g].to(dt) for g in ("g_q", "g_k", "g_v")])
    out[name] = {"q": q.detach(), "k": k.detach(), "v": v.detach(), "g_qkv": qkv.grad, "g_q_bias": q_bias.grad,
                 "g_v_bias": v_bias.grad, "g_temp": temp.grad}
# other tiles, the incoming gradients in three different layouts, read through their strides
cfg = qk_norm.KernelConfig(fwd_rows=5, fwd_warps=2, bwd_rows=7, bwd_warps=2, bwd_stages=2)
q, k, v, rnorm = qk_norm.launch_forward(qk_norm.qkv_norm_fwd_kernel, a["qkv"], a["q_bias"], a["v_bias"], a["temp"],
                                        qk_norm.EPS, cfg)
g_q = a["g_q"].transpose(1, 2).contiguous().transpose(1, 2)            # (B, H, L, hd)-contiguous
g_k = a["g_k"]                                                          # contiguous
g_v = torch.cat([a["g_v"], torch.full_like(a["g_v"][..., :8], float("nan"))], -1)[..., :24]   # padded heads
assert all(len({g.stride(i) for g in (g_q, g_k, g_v)}) == 3 for i in (1, 2))
g_qkv, g_q_bias, g_v_bias, g_temp = qk_norm.launch_backward(qk_norm.qkv_norm_bwd_kernel, g_q, g_k, g_v, a["qkv"],
                                                            a["q_bias"], rnorm, a["temp"], cfg)
out["tiles"] = {"q": q, "k": k, "v": v, "g_qkv": g_qkv, "g_q_bias": g_q_bias, "g_v_bias": g_v_bias,
                "g_temp": g_temp}
# the wrapper on a module: its projection, biases and temperatures fed to the kernel
from varcore.var import SelfAttention, VARConfig
attn = SelfAttention(VARConfig(**a["wrap_cfg"]))
attn.load_state_dict(a["wrap_state"])
with torch.no_grad():
    out["wrapper"] = [t.contiguous() for t in qk_norm.fused_qkv_heads(attn, a["wrap_x"])]
torch.save(out, sys.argv[2])
"""


def _inputs() -> dict:
    """bf16-representable values (so both runs read the same numbers); heads of q and k of very
    different sizes; the temperatures a cosine-attention model starts from (4) up to its cap (100)."""
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(B, L, 3, H, HD, generator=g) * torch.tensor([0.1, 3.0, 40.0]).view(1, 1, 1, H, 1)
    qkv[ZERO_K[0], ZERO_K[1], 1] = 0.0
    qkv[TINY_K[0], TINY_K[1], 1] = torch.randn(H, HD, generator=g) * 2e-14      # |k| about 1e-13
    qkv[TINY_K[0], TINY_K[1], 0, 0] = torch.randn(HD, generator=g) * 2e-14      # and q's head 0 (no bias there)
    qkv[SMALL_K[0], SMALL_K[1], 1] = torch.randn(H, HD, generator=g) * 2e-11    # |k| about 1e-10
    q_bias = (torch.randn(C, generator=g) * 0.2).bfloat16().float()
    q_bias[:HD] = 0.0
    grads = {k: torch.randn(B, L, H, HD, generator=g) for k in ("g_q", "g_k", "g_v")}
    q_k = (qkv[RADIAL[0], RADIAL[1], :2].bfloat16().float() + torch.stack([q_bias.view(H, HD), torch.zeros(H, HD)]))
    for i, name in enumerate(("g_q", "g_k")):   # 300 times the head's own direction, added
        grads[name][RADIAL] += 300 * F.normalize(q_k[i], dim=-1)
    grads = {k: v.bfloat16().float() for k, v in grads.items()}
    return {"qkv": qkv.view(B, L, 3 * C).bfloat16().float(),
            "q_bias": q_bias,
            "v_bias": (torch.randn(C, generator=g) * 0.2).bfloat16().float(),
            "temp": torch.tensor([4.0, 17.5, 100.0]), **grads, **_wrapper_inputs(g)}


def _wrapper_inputs(g: torch.Generator) -> dict:
    """A module with drawn biases and temperatures (1 to 100), and its input."""
    attn = SelfAttention(VARConfig(**WRAP))
    with torch.no_grad():
        attn.qkv.weight.normal_(0, 0.05, generator=g)
        attn.q_bias.normal_(0, 0.2, generator=g)
        attn.v_bias.normal_(0, 0.2, generator=g)
        attn.scale_mul_1H11.uniform_(0.0, 4.6, generator=g)
    x = torch.randn(2, 11, attn.H * attn.hd, generator=g)
    return {"wrap_cfg": WRAP, "wrap_state": attn.state_dict(), "wrap_x": x}


def _reference(a: dict):
    """Float64 outputs and gradients of the plain path's math (the biases added before the norm)."""
    qkv, q_bias, v_bias, temp = (a[k].double().requires_grad_() for k in ("qkv", "q_bias", "v_bias", "temp"))
    q, k, v = qkv.view(B, L, 3, C).unbind(2)
    q = F.normalize((q + q_bias).view(B, L, H, HD), dim=-1, eps=qk_norm.EPS) * temp.view(1, 1, H, 1)
    k = F.normalize(k.reshape(B, L, H, HD), dim=-1, eps=qk_norm.EPS)
    v = (v + v_bias).view(B, L, H, HD)
    torch.autograd.backward([q, k, v], [a[g].double() for g in ("g_q", "g_k", "g_v")])
    return {"q": q.detach(), "k": k.detach(), "v": v.detach(), "g_qkv": qkv.grad, "g_q_bias": q_bias.grad,
            "g_v_bias": v_bias.grad, "g_temp": temp.grad}


def _bounds(a: dict, ref: dict, stored: float = 0.0) -> dict:
    """Error bounds of the kernels against float64, per element: ``u = 2^-24`` per float32
    operation (the interpreter's division is correctly rounded), ``stored`` per rounding of q', k',
    v and the projection's gradient to their dtype (0 in float32, one bf16 step in bf16; the bias and
    temperature gradients stay float32).

    Forward, per element: the bias add (``u``); the squared norm, a sum of ``hd`` squares (at most
    ``hd u`` relative, halved by the square root); the square root, the reciprocal and the two
    products (``u`` each): ``e = (hd / 2 + 5) u`` relative, then the stored rounding.

    Backward, per head and token: ``xhat`` is recomputed as the forward computes it,
    ``(qkv + bias) |r|`` in float32, from the same stored inputs (the forward's ``e`` less the
    temperature's product: ``e_x = e`` has a ``u`` to spare; no stored rounding, in bf16 too);
    ``g = g_q' temp`` (``u``); ``dot = sum
    g xhat`` (``hd + 2`` roundings of the sum of absolute products, and ``e_x`` of it); the
    gradient ``r (g - xhat dot)`` adds ``u`` for the product, the difference and the product with
    ``r``, whose own error is the forward's ``e`` less the two products. The q bias's gradient sums
    the tokens' (its own error, ``N`` roundings of the absolute sum); the temperature's sums
    ``g_q' xhat`` over tokens and dims (``e_x + u`` each, ``hd + N`` roundings); v's is a copy."""
    u = U32
    e = (HD / 2 + 5) * u
    e_x = e
    e_r = e - 2 * u
    out = {"q": (e + stored) * ref["q"].abs(), "k": (e + stored) * ref["k"].abs(), "v": (u + stored) * ref["v"].abs()}
    temp = a["temp"].double().view(1, 1, H, 1)
    g_in = ref["g_qkv"].view(B, L, 3, H, HD)
    errs = []
    pairs = ((ref["q"] / temp, a["g_q"].double() * temp), (ref["k"], a["g_k"].double()))
    for i, ((xhat, g), r) in enumerate(zip(pairs, _reciprocal_norms(a))):
        S = (g.abs() * xhat.abs()).sum(-1, keepdim=True)
        dot = (g * xhat).sum(-1, keepdim=True)
        err_dot = (HD + 2) * u * S + e_x * S
        err = r * (u * g.abs() + xhat.abs() * (err_dot + e_x * dot.abs()) + u * (xhat * dot).abs()
                   + u * (g - xhat * dot).abs()) + (e_r + u) * g_in[:, :, i].abs()
        errs.append(err + stored * g_in[:, :, i].abs())
    out["g_qkv"] = torch.stack([errs[0], errs[1], torch.zeros_like(errs[0])], 2).view(B, L, 3 * C)
    g_q_in = g_in[:, :, 0].reshape(N, C)
    out["g_q_bias"] = (errs[0].reshape(N, C) - stored * g_q_in.abs()).sum(0) + N * u * g_q_in.abs().sum(0)
    out["g_v_bias"] = N * u * a["g_v"].abs().reshape(N, C).sum(0)
    t_terms = (a["g_q"].double() * ref["q"] / temp).abs()
    out["g_temp"] = ((e_x + u + (HD + N) * u) * t_terms).sum((0, 1, 3))
    return out


def _reciprocal_norms(a: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``1 / max(|x|, EPS)`` per (image, token, head) for q (bias added) and k, float64."""
    qkv = a["qkv"].double().view(B, L, 3, C)
    q = (qkv[:, :, 0] + a["q_bias"].double()).view(B, L, H, HD)
    k = qkv[:, :, 1].reshape(B, L, H, HD)
    return tuple(1 / x.norm(dim=-1, keepdim=True).clamp_min(qk_norm.EPS) for x in (q, k))


@pytest.fixture(scope="module")
def kernel_run(tmp_path_factory):
    a = _inputs()
    return a, run_child(_CHILD, a, tmp_path_factory.mktemp("qk_norm"))


def test_forward_and_backward_kernels_match_float64(kernel_run):
    a, out = kernel_run
    got, ref = out["fp32"], _reference(a)
    bound = _bounds(a, ref)
    for key in ("q", "k", "v", "g_qkv", "g_q_bias", "g_v_bias", "g_temp"):
        assert_within(got[key], ref[key], bound[key], key)
    # invariants: each head of q' has its temperature's length, each of k' length one (but the
    # floored keys: the zero key stays zero, the short one is k / EPS)
    lengths = got["q"].double().norm(dim=-1) / a["temp"].double()
    assert lengths[TINY_K][0] < 0.9
    lengths[TINY_K][0] = 1.0
    assert (lengths - 1).abs().max() < 1e-5
    k_len = got["k"].double().norm(dim=-1)
    assert torch.equal(got["k"][ZERO_K], torch.zeros(H, HD))
    assert (k_len[TINY_K] < 0.9).all()
    k_len[ZERO_K] = k_len[TINY_K] = 1.0
    assert (k_len - 1).abs().max() < 1e-5
    # v's gradient is the incoming one, copied; the gradient into q and k is orthogonal to them
    assert torch.equal(got["g_qkv"].view(B, L, 3, H, HD)[:, :, 2], a["g_v"])
    g_k_in = got["g_qkv"].double().view(B, L, 3, H, HD)[:, :, 1]
    along = (g_k_in * got["k"].double()).sum(-1).abs() / g_k_in.abs().sum(-1)
    along[ZERO_K] = along[TINY_K] = 0.0   # floored: g / EPS, not projected
    assert along.max() < 1e-5   # a few roundings of a 24-term row (u = 6e-8): about 2e-6


def test_the_floor_on_the_norm_passes_the_gradient_scaled(kernel_run):
    """Where ``|k| < EPS`` ``k / EPS`` is the output, so the gradient is ``g / EPS``, not projected
    (for the short key the projection would change it; for the zero key it is the same either way):
    one rounding of ``1 / EPS`` and one of the product."""
    a, out = kernel_run
    g_in = out["fp32"]["g_qkv"].view(B, L, 3, H, HD)
    for at in (ZERO_K, TINY_K):
        want = a["g_k"][at].double() / qk_norm.EPS
        assert ((g_in[at][1].double() - want).abs() <= 2 * U32 * want.abs()).all(), at
    want = a["g_q"][TINY_K][0].double() * a["temp"][0].double() / qk_norm.EPS   # q's head 0, times its temperature
    assert ((g_in[TINY_K][0, 0].double() - want).abs() <= 3 * U32 * want.abs()).all()


def test_a_mostly_radial_gradient_keeps_its_tangential_part(kernel_run):
    """At ``RADIAL`` the incoming q and k gradients are 300 times the head's own direction plus
    the drawn part; the normalisation's backward removes the 300 and keeps the drawn part's
    tangential component. In bf16 the kernel's error there is the stored rounding of its output
    (one bf16 step) and float32 terms about ``300 (hd + 2 + e/u) u`` of the kept part (2e-4).
    A backward reading ``xhat`` back from the bf16 outputs (round 18) left 300 times their
    rounding (``2^-9``), about half the kept part, as error there."""
    a, out = kernel_run
    got = out["bf16"]["g_qkv"].double().view(B, L, 3, H, HD)[RADIAL]
    want = _reference(a)["g_qkv"].view(B, L, 3, H, HD)[RADIAL]
    for i in (0, 1):
        rel = (got[i] - want[i]).norm(dim=-1) / want[i].norm(dim=-1)
        assert (rel < 2 * STEP).all(), ("qk"[i], rel)


def test_other_tiles_and_strided_gradients_compute_the_same(kernel_run):
    """Tiles change which program computes a token and the order of the bias and temperature sums
    only; gradients in another layout are read through their strides."""
    a, out = kernel_run
    tiles, got, ref = out["tiles"], out["fp32"], _reference(a)
    bound = _bounds(a, ref)
    for key in ("q", "k", "v", "g_qkv"):
        assert torch.equal(tiles[key], got[key]), key
    for key in ("g_q_bias", "g_v_bias", "g_temp"):
        assert_within(tiles[key], ref[key], bound[key], key)


def test_bf16_kernels_keep_each_tensor_in_its_dtype(kernel_run):
    """A bf16 projection with float32 biases and temperatures: q', k', v and the projection's
    gradient in bf16, the others float32. ``bound * (1 + STEP)``: a stored rounding is relative to
    the value before it, which is off from the reference by the float32 part of the bound."""
    a, out = kernel_run
    got, ref = out["bf16"], _reference(a)
    assert all(got[k].dtype == torch.bfloat16 for k in ("q", "k", "v", "g_qkv"))
    assert all(got[k].dtype == torch.float32 for k in ("g_q_bias", "g_v_bias", "g_temp"))
    bound = _bounds(a, ref, stored=STEP)
    for key in ("q", "k", "v", "g_qkv", "g_q_bias", "g_v_bias", "g_temp"):
        assert_within(got[key], ref[key], bound[key] * (1 + STEP), key)


def test_the_wrapper_feeds_the_kernel_the_modules_biases_and_temperatures(kernel_run):
    """``fused_qkv_heads`` on a float32 module against the module's ``qkv_heads`` in float64.

    Bound, per element: the float32 projection (a sum of ``C`` products: ``C u`` of ``|x| |W|``)
    and the bias added after it (``u``) perturb a head's row by ``d``; the normalisation moves
    the output by at most ``temp r (|d_i| + |xhat_i| sum_j |xhat_j| |d_j|)``; then the kernel's
    own ``(hd / 2 + 5) u`` relative. v: the projection's error and the add's ``u``."""
    a, out = kernel_run
    attn = SelfAttention(VARConfig(**WRAP)).double()
    attn.load_state_dict(a["wrap_state"])
    x = a["wrap_x"].double()
    with torch.no_grad():
        want = attn.qkv_heads(x)
        bias = torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias])
        raw = F.linear(x, attn.qkv.weight, bias)
        d = (attn.qkv.weight.shape[1] * U32 * (x.abs() @ attn.qkv.weight.abs().T) + U32 * raw.abs())
        Bw, Lw, C3 = raw.shape
        d_q, d_k, d_v = (t.view(Bw, Lw, attn.H, attn.hd).transpose(1, 2) for t in d.split(C3 // 3, -1))
        r_q, r_k, _ = (1 / t.view(Bw, Lw, attn.H, attn.hd).transpose(1, 2).norm(dim=-1, keepdim=True)
                       for t in raw.split(C3 // 3, -1))
        temp = attn.temperature_H().view(1, attn.H, 1, 1)
    e = (attn.hd / 2 + 5) * U32
    for i, (scale, r, d_) in enumerate(((temp, r_q, d_q), (1.0, r_k, d_k))):
        xhat = want[i] / scale
        bound = scale * r * (d_ + xhat.abs() * (xhat.abs() * d_).sum(-1, keepdim=True)) + e * want[i].abs()
        assert_within(out["wrapper"][i], want[i], bound, "qk"[i])
    assert_within(out["wrapper"][2], want[2], d_v + U32 * want[2].abs(), "v")


def test_plain_path_off_cuda_and_without_the_l2_norm(tiny_var_cfg):
    """On the CPU, or for attention without the L2 normalisation, the heads are the module's own."""
    attn = SelfAttention(tiny_var_cfg)
    x = torch.randn(2, tiny_var_cfg.L, tiny_var_cfg.C)   # the whole sequence, for the block-causal mask
    assert not qk_norm.fused_available(attn, x)
    for a_, b_ in zip(qk_norm.qkv_heads(attn, x), attn.qkv_heads(x)):
        assert torch.equal(a_, b_)
    torch.manual_seed(0)
    want = attn(x)
    assert torch.equal(qk_norm.attention_forward(attn, x), want)
    no_l2 = SelfAttention(VARConfig(**{**tiny_var_cfg.__dict__, "attn_l2_norm": False}))
    if torch.cuda.is_available() and qk_norm.triton is not None:
        assert qk_norm.fused_available(attn.cuda(), x.cuda())
        assert not qk_norm.fused_available(no_l2.cuda(), x.cuda())
