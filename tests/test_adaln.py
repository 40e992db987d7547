"""The training LayerNorm + AdaLN modulation kernels compute the block's math, forward and backward.

The Triton kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set before Triton is
imported, so in a child process), called through the registered ops with autograd, so the ops'
saved tensors and gradient wiring are checked with the kernels. Float32 inputs are compared with
float64 under bounds derived from the kernels' float32 arithmetic (:func:`_bounds`); the stream
``x + drop_path(y * gate)`` is float32 eager's bit for bit. A bf16 run checks the dtypes, with
inputs whose stream arithmetic is exact in bf16 (the interpreter truncates float32 to bf16 where
the GPU rounds to nearest; a truncation is under one bf16 step, ``2^-7`` relative).
Shapes: a width that is not a power of two (masked columns) and 71 tokens per image, so each
kernel's last tile of rows per image is partial (:data:`varcore.fast.adaln.KERNEL_CONFIG`: 2 rows
per forward program, 32 per backward program, 2 at a time; the child also runs 4 per forward
program and 16 per backward program, 1 at a time); three images, the middle one dropped.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import randomize_
from tests.interpreted import assert_within, run_child
from varcore.errors import ConfigError
from varcore.fast import adaln
from varcore.fast.plan import ExecutionPlan, apply_plan, reset_plan
from varcore.var import VAR, VARConfig

B, L, C, EPS, KEEP_P = 3, 71, 96, 1e-6, 0.5   # keep_p 1/2: the drop-path division is exact in bf16
KEEP = (1.0, 0.0, 1.0)

_CHILD = """
import os, sys
os.environ["TRITON_INTERPRET"] = "1"
import torch
from varcore.fast import adaln   # registers the ops
a = torch.load(sys.argv[1], weights_only=True)
out = {}
for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
    x, y, mod = (a[k].to(dt, copy=True).requires_grad_() for k in ("x", "y", "mod"))
    gate, _, scale1, scale2, shift1, shift2 = mod.unbind(2)
    h1, _, _ = torch.ops.varscale.adaln_ln_fwd(x, scale1, shift1, a["eps"], dt)
    x2, h2, _, _ = torch.ops.varscale.adaln_add_ln_fwd(x, y, gate, a["keep"], a["keep_p"], scale2, shift2,
                                                       a["eps"], dt)
    torch.autograd.backward([h1, x2, h2], [a["g_h1"].to(dt), a["g_x2"].to(dt), a["g_h2"].to(dt)])
    out[name] = {"h1": h1.detach(), "x2": x2.detach(), "h2": h2.detach(),
                 "g_x": x.grad, "g_y": y.grad, "g_mod": mod.grad}
# the add op's kernels under other tiles: 4 rows per forward program, 16 per backward one, 1 at a time, pipelined
cfg = adaln.KernelConfig(fwd_rows=4, fwd_warps=8, bwd_rows=16, bwd_tile=1, bwd_warps=8, bwd_stages=2)
x, y, mod = (a[k] for k in ("x", "y", "mod"))
gate, _, _, scale2, _, shift2 = mod.unbind(2)
x2, h2, mean, rstd = adaln.launch_forward(adaln.adaln_fwd_kernel, x, y, gate, a["keep"], a["keep_p"], scale2,
                                          shift2, a["eps"], torch.float32, cfg)
g_x, g_y, g_gate, g_scale, g_shift, _ = adaln.launch_backward(adaln.adaln_bwd_kernel, a["g_h2"], a["g_x2"], x2, y,
                                                              gate, a["keep"], a["keep_p"], scale2, mean, rstd, cfg)
out["tiles"] = {"x2": x2, "h2": h2, "g_x2": g_x, "g_y": g_y, "g_gate": g_gate, "g_scale2": g_scale,
                "g_shift2": g_shift}
# 1 + scale in float32: a float32 stream with bf16 scales too small for bf16 to hold 1 + scale
small = a["small_scale"].bfloat16()
_, h, mean, rstd = adaln.launch_forward(adaln.adaln_fwd_kernel, a["x"], None, None, None, None, small,
                                        torch.zeros_like(small), a["eps"], torch.float32)
g_x, _, _, _, _, _ = adaln.launch_backward(adaln.adaln_bwd_kernel, a["g_h1"], None, a["x"], None, None, None, None,
                                           small, mean, rstd)
out["small_scale"] = {"h": h, "g_x": g_x}
# the branch's bias (the output projection's or fc2's) added by the add op, its gradient summed there
x, y, mod, bias = (a[k].clone().requires_grad_() for k in ("x", "y", "mod", "bias"))
gate, _, _, scale2, _, shift2 = mod.unbind(2)
x2, h2, _, _ = torch.ops.varscale.adaln_add_ln_fwd(x, y, gate, a["keep"], a["keep_p"], scale2, shift2, a["eps"],
                                                   torch.float32, bias)
torch.autograd.backward([x2, h2], [a["g_x2"], a["g_h2"]])
out["bias"] = {"x2": x2.detach(), "h2": h2.detach(), "g_x": x.grad, "g_y": y.grad, "g_mod": mod.grad,
               "g_bias": bias.grad}
torch.save(out, sys.argv[2])
"""


def _inputs() -> dict:
    """Stream values with at most 6 significant bits in a narrow range, ``y`` and ``gate`` with
    at most 4 each, so ``x + y * gate / keep_p`` is exact in bf16 as in float32."""
    g = torch.Generator().manual_seed(11)
    mod = torch.randn(B, 1, 6, C, generator=g) * 0.3
    mod[:, :, 0] = torch.randint(-8, 9, (B, 1, C), generator=g) / 8                 # gate
    mod[:, :, 2:4] = (torch.randint(-8, 9, (B, 1, 2, C), generator=g) / 16)          # scale: 1 + scale exact
    return {"x": torch.randint(-32, 33, (B, L, C), generator=g) / 8 + 1.0,
            "y": torch.randint(-8, 9, (B, L, C), generator=g) / 4,
            "mod": mod.bfloat16().float(),     # bf16 values, so the bf16 run reads the same numbers
            "keep": torch.tensor(KEEP), "keep_p": torch.tensor(KEEP_P), "eps": EPS,
            "small_scale": torch.randint(-15, 16, (B, 1, C), generator=g) * 2.0 ** -12,   # |s| < 2^-8
            "bias": torch.randint(-8, 9, (C,), generator=g) / 8,   # y + bias exact in float32
            **{k: torch.randn(B, L, C, generator=g).bfloat16().float() for k in ("g_h1", "g_x2", "g_h2")}}


def _reference(a: dict):
    """Float64 outputs and gradients of the block's eager math (``g_x2``: the whole gradient that
    reaches the stream ``x2``, the given one plus the second LayerNorm's)."""
    x, y, mod = (a[k].double().requires_grad_() for k in ("x", "y", "mod"))
    gate, _, scale1, scale2, shift1, shift2 = mod.unbind(2)
    keep = (a["keep"].double() / a["keep_p"].double()).view(B, 1, 1)
    h1 = F.layer_norm(x, (C,), eps=EPS) * (1 + scale1) + shift1
    x2 = x + y * gate * keep
    x2.retain_grad()
    h2 = F.layer_norm(x2, (C,), eps=EPS) * (1 + scale2) + shift2
    torch.autograd.backward([h1, x2, h2], [a[k].double() for k in ("g_h1", "g_x2", "g_h2")])
    return {"h1": h1.detach(), "x2": x2.detach(), "h2": h2.detach(), "g_x": x.grad, "g_y": y.grad,
            "g_mod": mod.grad, "g_x2": x2.grad}


def _bounds(a: dict, ref: dict) -> dict:
    """Float32 error bounds of the kernels against float64, per element (``u = 2^-24``).

    Forward: the mean and the variance are sums of ``C`` terms, so the normalised value ``xhat``
    is off by at most ``E = (2 C + 8) u |x|_max rstd`` (the ``+ 8`` counts the roundings of the
    subtraction, the division, the square root and the product); ``h = xhat (1 + s) + shift``
    adds ``|1 + s| E`` and two roundings.

    Backward, per row: ``g = g_h (1 + s)``, ``c1 = mean(g xhat)``, ``c2 = mean(g)`` and
    ``g_ln = rstd (g - xhat c1 - c2)``. ``c1`` and ``c2`` are sums of ``C`` terms (``C u`` of
    their absolute sums) and ``c1`` also carries ``xhat``'s ``E``; each of the three terms is a
    product of at most three factors, each off by at most ``E`` relative to the row's scale, so
    ``|err g_ln| <= 3 E rstd (2 |g|_max + |xhat|_max |g xhat|_max)``. The stream's gradient adds
    the given one (one rounding), and ``x``'s is the autograd sum of both ops' (one more). The
    branch's is that times ``gate keep / keep_p`` (two roundings). The modulation's gradients are
    sums over an image's ``L`` tokens (``(L + 3) u`` of their absolute sums) of products carrying
    ``E`` or the stream gradient's error."""
    u = 2.0 ** -24
    out = {}
    mod = a["mod"].double()
    for i, (xs, gh_key, s_idx) in enumerate(((a["x"].double(), "g_h1", 2), (ref["x2"], "g_h2", 3))):
        rstd = 1 / (xs.var(-1, unbiased=False, keepdim=True) + EPS).sqrt()
        xhat = (xs - xs.mean(-1, keepdim=True)) * rstd
        E = (2 * C + 8) * u * xs.abs().amax(-1, keepdim=True) * rstd
        one_plus = 1 + mod[:, :, s_idx]
        out[f"h{i + 1}"] = one_plus.abs() * E + 2 * u * (xhat * one_plus).abs() + 2 * u * mod[:, :, s_idx + 2].abs()
        g_h = a[gh_key].double()
        g = g_h * one_plus
        M = rstd * (2 * g.abs().amax(-1, keepdim=True)
                    + xhat.abs().amax(-1, keepdim=True) * (g * xhat).abs().amax(-1, keepdim=True))
        out[f"g_ln{i + 1}"] = 3 * E * M
        out[f"g_scale{i + 1}"] = ((L + 3) * u * (g_h * xhat).abs() + g_h.abs() * E).sum(1, keepdim=True)
        out[f"g_shift{i + 1}"] = (L + 3) * u * g_h.abs().sum(1, keepdim=True)
    keep = (a["keep"].double() / a["keep_p"].double()).view(B, 1, 1)
    gate, y, g_x2 = mod[:, :, 0], a["y"].double(), ref["g_x2"]
    err_gx2 = out["g_ln2"] + u * g_x2.abs()
    out["g_x"] = err_gx2 + out["g_ln1"] + u * ref["g_x"].abs()
    out["g_y"] = (gate * keep).abs() * err_gx2 + 2 * u * ref["g_y"].abs()
    out["g_gate"] = keep * ((L + 3) * u * (g_x2 * y).abs() + y.abs() * err_gx2).sum(1, keepdim=True)
    out["g_x2"] = out["g_ln2"] + u * g_x2.abs()   # the add op's own output: no autograd sum after it
    # a branch bias's gradient: every token's branch gradient, summed per chunk of rows, scaled by
    # gate keep / keep_p (three roundings) and summed over the chunks: at most B L terms in all
    out["g_bias"] = ((gate * keep).abs() * err_gx2 + (B * L + 3) * u * ref["g_y"].abs()).sum((0, 1))
    return out


@pytest.fixture(scope="module")
def kernel_run(tmp_path_factory):
    a = _inputs()
    return a, run_child(_CHILD, a, tmp_path_factory.mktemp("adaln"))


def test_forward_and_backward_kernels_match_float64(kernel_run):
    a, out = kernel_run
    got, ref, bound = out["fp32"], _reference(a), _bounds(a, _reference(a))
    x, y, mod = a["x"], a["y"], a["mod"]
    keep_B11 = a["keep"].view(B, 1, 1)
    assert torch.equal(got["x2"], x + y.mul(mod[:, :, 0]) * keep_B11 / a["keep_p"])   # float32 eager, bit for bit
    assert_within(got["h1"], ref["h1"], bound["h1"], "h1")
    assert_within(got["h2"], ref["h2"], bound["h2"], "h2")
    assert_within(got["g_x"], ref["g_x"], bound["g_x"], "g_x")
    assert_within(got["g_y"], ref["g_y"], bound["g_y"], "g_y")
    g_mod, r_mod = got["g_mod"], ref["g_mod"]
    for k, key in ((0, "g_gate"), (2, "g_scale1"), (3, "g_scale2"), (4, "g_shift1"), (5, "g_shift2")):
        assert_within(g_mod[:, :, k], r_mod[:, :, k], bound[key], key)
    assert torch.equal(g_mod[:, :, 1], torch.zeros(B, 1, C))    # gamma2 is not an input of these ops
    # the dropped image: no gradient into its branch or its gate, the stream's gradient all there
    assert torch.equal(got["g_y"][1], torch.zeros(L, C)) and torch.equal(g_mod[1, :, 0], torch.zeros(1, C))
    assert got["g_x"][1].abs().sum() > 0


def test_branch_bias_added_and_its_gradient_summed_by_the_kernels(kernel_run):
    """With the output projection's (or fc2's) bias handed to the add op, the stream is float32
    eager's ``x + (y + bias) gate keep / keep_p`` bit for bit and every gradient, the bias's
    included (the branch's summed over every token of every image), is within its float32 bound."""
    a, out = kernel_run
    got, bias = out["bias"], a["bias"]
    y_eff = a["y"] + bias
    ref = _reference({**a, "y": y_eff})
    # |y| + |bias| bounds the gate gradient's factor |y + bias|
    bound = _bounds({**a, "y": a["y"].abs() + bias.abs()}, ref)
    keep_B11 = a["keep"].view(B, 1, 1)
    assert torch.equal(got["x2"], a["x"] + y_eff.mul(a["mod"][:, :, 0]) * keep_B11 / a["keep_p"])
    assert_within(got["h2"], ref["h2"], bound["h2"], "h2")
    assert_within(got["g_x"], ref["g_x2"], bound["g_x2"], "g_x")
    assert_within(got["g_y"], ref["g_y"], bound["g_y"], "g_y")
    for k, key in ((0, "g_gate"), (3, "g_scale2"), (5, "g_shift2")):
        assert_within(got["g_mod"][:, :, k], ref["g_mod"][:, :, k], bound[key], key)
    assert_within(got["g_bias"], ref["g_y"].sum((0, 1)), bound["g_bias"], "g_bias")
    assert got["g_bias"].abs().sum() > 0 and torch.equal(got["g_y"][1], torch.zeros(L, C))   # the dropped image


_MODEL_CHILD = """
import os, sys
os.environ["TRITON_INTERPRET"] = "1"
import torch
from varcore.fast import adaln, add_norm
from varcore.fast.plan import ExecutionPlan, apply_plan
from varcore.var import VAR, VARConfig
a = torch.load(sys.argv[1], weights_only=True)
# the kernels for CPU tensors too (the interpreter runs them): every condition but the device
add_norm.fused_available = lambda x, ln: ln.weight is None and ln.bias is None
folds_with_kernels, branches = adaln._bias_folds, (adaln._attention_branch, adaln._ffn_branch)
decisions = []
cfg = VARConfig(**a["cfg"])
out = {"decisions": decisions}


def recording(branch, names, sums):
    # the branch, its gradient's absolute values summed over the tokens kept per bias (the terms of its gradient)
    def run(module, h, *rest):
        y, bias = branch(module, h, *rest)
        name = names[id((module.proj if hasattr(module, "proj") else module.fc2).bias)]
        y.register_hook(lambda g: sums.__setitem__(name, g.abs().sum((0, 1))))
        return y, bias
    return run


for case in ("zero_bias", "zero_weight"):
    model = VAR(cfg)
    model.load_state_dict(a[case])
    model = apply_plan(model.train(), ExecutionPlan(norm="fused").resolve(cfg, "cpu", training=True))
    names = {id(p): n for n, p in model.named_parameters()}
    for fold in (True, False):
        sums = {}
        if fold:
            adaln._bias_folds = lambda *v: decisions.append(folds_with_kernels(*v)) or decisions[-1]
            adaln._attention_branch, adaln._ffn_branch = branches
        else:
            adaln._bias_folds = lambda *v: False
            adaln._attention_branch, adaln._ffn_branch = (recording(b, names, sums) for b in branches)
        model.zero_grad(set_to_none=False)
        torch.manual_seed(3)
        logits = model(a["label"], a["x"])
        logits.square().mean().backward()
        out[case, fold] = {"logits": logits.detach(), **{n: p.grad.clone() for n, p in model.named_parameters()}}
    out[case, "abs_sums"] = sums
# a dropout after the linears keeps their bias in them (dropout of y + bias is not dropout of y plus bias)
cfg = VARConfig(**{**a["cfg"], "drop_rate": 0.1})
block = VAR(cfg).blocks[0]
x, v = torch.zeros(2, 3, cfg.C), torch.zeros(2, 1, cfg.C)
out["dropout"] = (folds_with_kernels(block.train(), x, v), folds_with_kernels(block.eval(), x, v))
torch.save(out, sys.argv[2])
"""


@pytest.fixture(scope="module")
def model_run(tmp_path_factory):
    """A d2 plan model's forward and backward with the kernels (interpreted), the output
    projection's and fc2's biases added by the add kernels and not (``(case, fold)``), in two
    models where adding the bias is exact in both places: zero biases, and zero weights under
    nonzero biases (so ``y + bias`` is ``bias`` whichever adds it)."""
    cfg = VARConfig(depth=2, vocab_size=16, Cvae=8, patch_nums=(1, 2, 3), num_classes=5, drop_path_rate=0.0,
                    cond_drop_rate=0.0)
    torch.manual_seed(0)
    state = randomize_(VAR(cfg)).state_dict()
    g = torch.Generator().manual_seed(5)
    branch_bias, branch_weight = ("proj.bias", "fc2.bias"), ("proj.weight", "fc2.weight")
    cases = {"zero_bias": {k: torch.zeros_like(v) if k.endswith(branch_bias) else v for k, v in state.items()},
             "zero_weight": {k: torch.zeros_like(v) if k.endswith(branch_weight) else
                             torch.randn(v.shape, generator=g) / 2 if k.endswith(branch_bias) else v
                             for k, v in state.items()}}
    inputs = {"cfg": dict(cfg.__dict__), **cases, "label": torch.arange(4) % cfg.num_classes,
              "x": torch.randn(4, cfg.L - cfg.first_l, cfg.Cvae, generator=g)}
    return cfg, run_child(_MODEL_CHILD, inputs, tmp_path_factory.mktemp("adaln_model"))


def test_blocks_hand_the_branch_biases_to_the_add_kernels(model_run):
    """Where the kernels run, each block's output projection and fc2 leave their bias to the add
    kernel that takes their branch (the next block's, or the head's, for fc2): the same logits
    and gradients as the linears adding it, bit for bit (in these models adding it is exact
    either way), except the biases' gradients. Those sum the same ``N`` terms (the branch's
    gradient per token, ``N`` tokens in the batch) in another order, the kernels' with the gate
    applied to partial sums instead of to each term: each sum is off by at most ``(N - 1) u`` of
    the terms' absolute sum, plus three roundings, so the two differ by at most ``(2 N + 4) u`` of it."""
    cfg, out = model_run
    assert out["decisions"] and all(out["decisions"])   # the folded runs did fold, in every block
    assert out["dropout"] == (False, True)
    u, N = 2.0 ** -24, 4 * cfg.L
    for case in ("zero_bias", "zero_weight"):
        on, off, abs_sums = out[case, True], out[case, False], out[case, "abs_sums"]
        assert torch.equal(on["logits"], off["logits"]), case
        assert sorted(abs_sums) == sorted(n for n in off if n.endswith(("proj.bias", "fc2.bias")))
        for name, g_off in off.items():
            if name in abs_sums:
                assert g_off.abs().sum() > 0, (case, name)
                assert_within(on[name], g_off.double(), (2 * N + 4) * u * abs_sums[name].double(), f"{case} {name}")
            else:
                assert torch.equal(on[name], g_off), (case, name)


def test_one_plus_scale_is_not_rounded_to_the_modulations_dtype(kernel_run):
    """A bf16 scale under 2^-8 (2^-9 if negative) is lost if ``1 + scale`` is rounded to bf16 (as eager's
    composition does under autocast); the kernels keep it in float32, as inductor's composition
    does, so a float32 stream's ``h`` and gradient are within the float32 bounds."""
    a, out = kernel_run
    got = out["small_scale"]
    mod = torch.zeros(B, 1, 6, C)
    mod[:, :, 2] = a["small_scale"]
    small = {**a, "mod": mod}
    x = a["x"].double().requires_grad_()
    s = a["small_scale"].double()
    h = F.layer_norm(x, (C,), eps=EPS) * (1 + s)
    h.backward(a["g_h1"].double())
    bound = _bounds(small, _reference(small))
    assert_within(got["h"], h.detach(), bound["h1"], "h")
    assert_within(got["g_x"], x.grad, bound["g_ln1"] + 2.0 ** -24 * x.grad.abs(), "g_x")


def test_other_tiles_compute_the_same(kernel_run):
    """Row tiles change which program computes a row and the order of the per-image sums only."""
    a, out = kernel_run
    tiles, got, ref = out["tiles"], out["fp32"], _reference(a)
    bound = _bounds(a, ref)
    assert torch.equal(tiles["x2"], got["x2"]) and torch.equal(tiles["h2"], got["h2"])
    assert torch.equal(tiles["g_y"], got["g_y"])
    assert_within(tiles["g_x2"], ref["g_x2"], bound["g_x"], "g_x2")
    for k, key in ((0, "g_gate"), (3, "g_scale2"), (5, "g_shift2")):
        assert_within(tiles[key], ref["g_mod"][:, :, k], bound[key], key)


def test_bf16_kernels_keep_each_tensor_in_its_dtype(kernel_run):
    a, out = kernel_run
    got, ref, bound = out["bf16"], _reference(a), _bounds(a, _reference(a))
    assert all(t.dtype == torch.bfloat16 for t in got.values())
    assert torch.equal(got["x2"].float(), out["fp32"]["x2"])   # the inputs make the stream exact in bf16
    step = 2.0 ** -7   # one bf16 rounding (truncation in the interpreter), relative
    for key in ("h1", "h2", "g_y"):   # rounded once to bf16
        assert_within(got[key], ref[key], bound[key] + step * ref[key].abs() * (1 + step), key)
    # x's gradient: both ops' bf16 outputs (the stream's, the first LayerNorm's), summed in bf16
    g_ln1 = ref["g_x"] - ref["g_x2"]
    spread = ref["g_x2"].abs() + g_ln1.abs() + ref["g_x"].abs()
    assert_within(got["g_x"], ref["g_x"], bound["g_x"] + step * spread * (1 + step) ** 2, "g_x")


def test_plan_forwards_are_the_model_on_cpu(tiny_var_cfg):
    """Off CUDA the plan's model, block and head forwards (each block's last residual add done
    by the next block, or the head) run the eager composition: the plain model's outputs and
    gradients bit for bit, drop-path draws included."""
    cfg = VARConfig(**{**tiny_var_cfg.__dict__, "drop_path_rate": 0.3, "cond_drop_rate": 0.0})
    torch.manual_seed(0)
    plain = VAR(cfg).train()
    fused = apply_plan(copy.deepcopy(plain), ExecutionPlan(norm="fused").resolve(cfg, "cpu", training=True))
    assert all(b.forward.__func__ is adaln.block_forward for b in fused.blocks)
    assert fused.head.forward.__func__ is adaln.head_forward and fused.forward.__func__ is adaln.var_forward
    label = torch.arange(4) % cfg.num_classes
    x = torch.randn(4, cfg.L - cfg.first_l, cfg.Cvae)
    outs = []
    for m in (plain, fused):
        torch.manual_seed(3)
        out = m(label, x)
        out.square().mean().backward()
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(plain.parameters(), fused.parameters()))
    reset_plan(fused)
    assert all("forward" not in m.__dict__ for m in (*fused.blocks, fused.head, fused))


def test_norm_is_fused_only_for_training_on_cuda(tiny_var_cfg):
    resolve = ExecutionPlan().resolve
    assert resolve(tiny_var_cfg, "cpu", training=True).norm == "plain"
    assert resolve(tiny_var_cfg, "cuda", training=False).norm == "plain"
    want = "fused" if adaln.triton is not None else "plain"
    assert resolve(tiny_var_cfg, "cuda", training=True, amp=torch.bfloat16).norm == want
    with pytest.raises(ConfigError) as e:
        ExecutionPlan(norm="triton")
    assert e.value.field == "norm"


def test_kernels_only_for_layouts_they_read():
    ln = torch.nn.LayerNorm(C, elementwise_affine=False)
    x = torch.zeros(B, L, C)
    vec = torch.zeros(B, 1, 6, C).unbind(2)[0]
    assert not adaln.fused_available(x, ln, vec)                               # CPU
    if torch.cuda.is_available() and adaln.triton is not None:
        xc = x.cuda()
        assert adaln.fused_available(xc, ln, vec.cuda())
        assert not adaln.fused_available(xc, ln, vec.cuda().transpose(1, 2))    # not (B, 1, C)
        assert not adaln.fused_available(xc, torch.nn.LayerNorm(C).cuda(), vec.cuda())   # affine LayerNorm
