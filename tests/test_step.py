"""varcore.step: the training step shared by the trainer and the speed benchmark.

The CUDA-graph replay is checked on the GPU (``benchmarks/train_step.py --graph-check``);
here the eager step's math, its options and the trainer's settings for the graph.
"""

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from pipeline.training.config import TrainParams
from pipeline.training.state import TrainState, load_state, save_state
from pipeline.training.worker import make_optimizer
from varcore import VAR, VARConfig
from varcore.fast.master_weights import MasterWeights, adamw_update
from varcore.fast.plan import ExecutionPlan, apply_plan
from varcore.step import TrainStep, adamw, var_loss


def _batch(cfg, B, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, cfg.num_classes, (B,), generator=g),
            torch.randn(B, cfg.L - cfg.first_l, cfg.Cvae, generator=g),
            torch.randint(0, cfg.vocab_size, (B, cfg.L), generator=g))


def test_var_loss_is_the_mean_token_cross_entropy():
    logits = torch.randn(2, 5, 7, dtype=torch.bfloat16)
    target = torch.randint(0, 7, (2, 5))
    want = -torch.log_softmax(logits.float(), -1).gather(-1, target[..., None]).mean()
    assert var_loss(logits, target).dtype == torch.float32
    torch.testing.assert_close(var_loss(logits, target), want)


@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_step_equals_a_hand_written_step(tiny_var_cfg, clip):
    """Forward, float32 cross-entropy, backward, clipping, AdamW at the given lr, with the
    random draws (class dropout, drop-path) of the seed set before the call."""
    cfg = tiny_var_cfg.__class__(**{**tiny_var_cfg.__dict__, "drop_path_rate": 0.2, "cond_drop_rate": 0.5})
    model = VAR(cfg).train()
    ref = copy.deepcopy(model)
    opt = adamw(model.parameters(), 1e-3, (0.9, 0.95), 0.05, torch.device("cpu"))
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05, eps=1e-8)
    step = TrainStep(model, opt, grad_clip=clip)
    for s, lr in enumerate([1e-3, 3e-3, 2e-3]):
        label, x, target = _batch(cfg, 3, s)
        torch.manual_seed(100 + s)
        loss, norm = step(label, x, target, lr)
        torch.manual_seed(100 + s)
        for g in ref_opt.param_groups:
            g["lr"] = lr
        ref_opt.zero_grad(set_to_none=True)
        ref_loss = F.cross_entropy(ref(label, x).flatten(0, 1), target.flatten())
        ref_loss.backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), clip) if clip else None
        ref_opt.step()
        assert torch.equal(loss, ref_loss.detach())
        if clip:
            assert torch.equal(norm, ref_norm) and norm > clip   # the norm before clipping
        else:
            assert torch.isnan(norm)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), name
    assert not step.cuda_graph and step.graph is None and step.calls == 3


def test_cuda_graph_needs_a_cuda_model(tiny_var):
    opt = adamw(tiny_var.parameters(), 1e-3, (0.9, 0.95), 0.0, torch.device("cpu"))
    with pytest.raises(ValueError, match="cuda_graph needs the model on a CUDA device, it is on cpu"):
        TrainStep(tiny_var, opt, cuda_graph=True)


def test_adamw_is_fused_only_on_cuda(tiny_var):
    assert not adamw(tiny_var.parameters(), 1e-3, (0.9, 0.95), 0.0, torch.device("cpu")).defaults.get("fused")
    meta = adamw([torch.nn.Parameter(torch.zeros(2, device="meta"))], 1e-3, (0.9, 0.95), 0.0, torch.device("cuda"))
    assert meta.defaults["fused"] is True


@pytest.mark.parametrize("setting, device, world, fsdp, want", [
    ("auto", "cuda", 1, False, True),
    ("auto", "cpu", 1, False, False),
    ("auto", "cuda", 2, False, False),   # DDP: the all-reduce is not captured
    ("auto", "cuda", 1, True, False),    # FSDP
    (False, "cuda", 1, False, False),
])
def test_trainer_captures_only_one_cuda_worker(setting, device, world, fsdp, want):
    plan = ExecutionPlan(cuda_graph=setting).resolve(VARConfig(depth=2), device, training=True, amp=torch.bfloat16,
                                                     world=world, fsdp=fsdp)
    assert plan.cuda_graph is want
    step = TrainStep.from_plan(torch.nn.Linear(2, 2), torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]),
                               dataclasses.replace(plan, cuda_graph=False), amp=torch.bfloat16)
    assert step.cuda_graph is False and (step.master is not None) == plan.master_weights


def test_checkpoint_of_a_graph_step_resumes_anywhere(tmp_path, tiny_var):
    """A CUDA-graph step keeps the learning rate as a tensor and the optimizer capturable;
    checkpoints store a float and capturable off, so they resume on any device, eagerly."""
    tp = TrainParams(steps=1)
    model = tiny_var.train()
    opt = make_optimizer(model, tp)
    for g in opt.param_groups:
        g["lr"] = torch.tensor(2e-3)
    TrainStep(model, opt)(*_batch(model.cfg, 2, 0))
    for g in opt.param_groups:
        g["capturable"] = True   # as TrainStep(cuda_graph=True) sets it
    save_state(tmp_path, model, opt, TrainState(step=1))
    saved = torch.load(tmp_path / "state.pt", weights_only=True)["optim"]["param_groups"]
    assert all(type(g["lr"]) is float and g["capturable"] is False for g in saved)
    model2 = VAR(model.cfg).train()
    opt2 = make_optimizer(model2, tp)
    assert load_state(tmp_path, model2, opt2).step == 1
    for g in opt2.param_groups:
        assert g["lr"] == pytest.approx(2e-3)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
        torch.testing.assert_close(opt.state[p]["exp_avg"], opt2.state[q]["exp_avg"], rtol=0, atol=0)
    TrainStep(model2, opt2)(*_batch(model.cfg, 2, 1), 1e-3)   # resumes on the CPU


# ---- master weights ------------------------------------------------------------------------------
def test_adamw_reference_is_torch_adamw():
    """The master-weight update (kernel and reference share its formula) against torch's AdamW."""
    p = torch.randn(300)
    q = torch.nn.Parameter(p.clone())
    opt = torch.optim.AdamW([q], lr=3e-3, betas=(0.9, 0.95), weight_decay=0.05, eps=1e-8, foreach=False)
    m, v, copy = torch.zeros(300), torch.zeros(300), torch.empty(300, dtype=torch.bfloat16)
    for step in range(1, 4):
        g = torch.randn(300)
        q.grad = g * 0.5
        opt.step()
        adamw_update(p, copy, g, m, v, torch.tensor(float(step)), torch.tensor(3e-3), torch.tensor(0.5),
                     0.9, 0.95, 1e-8, 0.05)
        torch.testing.assert_close(p, q.detach(), rtol=0, atol=3e-7)   # an ulp or two; a wrong update is ~lr
        torch.testing.assert_close(m, opt.state[q]["exp_avg"], rtol=1e-6, atol=0)
        torch.testing.assert_close(v, opt.state[q]["exp_avg_sq"], rtol=1e-6, atol=0)
        assert torch.equal(copy, p.to(torch.bfloat16))


def _wide_cfg(cfg):
    # width 256: the FFN and AdaLN weights reach MIN_NUMEL and get bf16 copies
    return cfg.__class__(**{**cfg.__dict__, "width": 256, "num_heads": 4, "drop_path_rate": 0.2,
                            "cond_drop_rate": 0.5})


EPS32 = torch.finfo(torch.float32).eps
BF16_UNIT_ROUNDOFF = 2.0 ** -8


def _twin_steps(tiny_var_cfg, clip, compiled, request):
    """The autocast step and the master-weight step on copies of one model (and their optimizers);
    ``compiled``: blocks and head through the ``aot_eager`` fixture's backend."""
    cfg = _wide_cfg(tiny_var_cfg)
    ref = VAR(cfg).train()
    if compiled:
        request.getfixturevalue("aot_eager")
        apply_plan(ref, ExecutionPlan(attention="dense", mlp="plain", compile=True, checkpointing=1).resolve(
            cfg, "cpu", training=True))
    model = copy.deepcopy(ref)
    cpu = torch.device("cpu")
    ref_step = TrainStep(ref, adamw(ref.parameters(), 1e-3, (0.9, 0.95), 0.05, cpu), amp=torch.bfloat16,
                         grad_clip=clip)
    step = TrainStep(model, adamw(model.parameters(), 1e-3, (0.9, 0.95), 0.05, cpu), amp=torch.bfloat16,
                     grad_clip=clip, master_weights=True)
    # per block qkv, proj, fc1, fc2, ada_lin; the head's AdaLN (its 64-way head is below MIN_NUMEL)
    assert len(step.master) == 2 * 5 + 1 and {c.dtype for c in step.master.copies} == {torch.bfloat16}
    return cfg, (ref, ref_step), (model, step)


def _pairs(model, step, ref, ref_step):
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert p.dtype == torch.float32 and isinstance(p, torch.nn.Parameter), name
        assert step.optim.state[p].keys() == ref_step.optim.state[q].keys() == {"step", "exp_avg", "exp_avg_sq"}
        yield name, p, q, step.optim.state[p], ref_step.optim.state[q]


@pytest.mark.parametrize("clip, compiled", [(0.0, False), (0.05, False), (0.05, True)])
def test_master_weights_first_step_is_the_autocast_step(tiny_var_cfg, clip, compiled, request):
    """From the same weights, the bf16 copies are autocast's casts bit for bit, so the forward is
    the same computation (equal losses); the gradient norm sums the same squares in another order
    (relative error <= 50 tensors x eps32 < 4e-6), and the update is AdamW's in another float32
    order: the first Adam step moves each weight by +-lr whatever the gradient's scale, so the
    weights agree within 4 eps32 (|w| + lr) and the moments within the norm's 4e-6 (8e-6 squared)."""
    cfg, (ref, ref_step), (model, step) = _twin_steps(tiny_var_cfg, clip, compiled, request)
    batch = _batch(cfg, 3, 0)
    torch.manual_seed(100)
    want_loss, want_norm = ref_step(*batch, 1e-3)
    torch.manual_seed(100)
    loss, norm = step(*batch, 1e-3)
    assert torch.equal(loss, want_loss)
    torch.testing.assert_close(norm, want_norm, rtol=4e-6, atol=0, equal_nan=True)
    for name, p, q, st, ref_st in _pairs(model, step, ref, ref_step):
        assert ((p - q).abs() <= 4 * EPS32 * (q.abs() + 1e-3)).all(), name
        torch.testing.assert_close(st["exp_avg"], ref_st["exp_avg"], rtol=4e-6 + 2 * EPS32, atol=0, msg=name)
        torch.testing.assert_close(st["exp_avg_sq"], ref_st["exp_avg_sq"], rtol=8e-6 + 2 * EPS32, atol=0, msg=name)
    for c, p in zip(step.master.copies, step.master.masters):
        assert torch.equal(c, p.to(torch.bfloat16))


@pytest.mark.parametrize("clip, compiled", [(0.0, False), (0.05, False), (0.05, True)])
def test_master_weights_steps_track_the_autocast_steps(tiny_var_cfg, clip, compiled, request):
    """Over three steps the two trajectories stay together, but not bit for bit on every CPU: once a
    master weight and its autocast twin differ in the last float32 bit, one in 2^16 of them rounds
    to the neighbouring bf16 value (a move of 2^-8 of itself), and Adam normalises the gradients
    that respond to it. So: losses and gradient norms within 1e-5, and all weights and moments
    together within one bf16 unit roundoff (2^-8) of their norm (measured: <= 3e-5 with and without
    AVX-512; a wrong AdamW moves every weight by about lr, 1e-2 of the norm here)."""
    cfg, (ref, ref_step), (model, step) = _twin_steps(tiny_var_cfg, clip, compiled, request)
    for s, lr in enumerate([1e-3, 3e-3, 2e-3]):
        batch = _batch(cfg, 3, s)
        torch.manual_seed(100 + s)
        want_loss, want_norm = ref_step(*batch, lr)
        torch.manual_seed(100 + s)
        loss, norm = step(*batch, lr)
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=0)
        torch.testing.assert_close(norm, want_norm, rtol=1e-5, atol=0, equal_nan=True)
    pairs = list(_pairs(model, step, ref, ref_step))
    for key in ("weights", "exp_avg", "exp_avg_sq"):
        pick = (lambda p, q, st, rst: (p.detach(), q.detach())) if key == "weights" else \
            (lambda p, q, st, rst, k=key: (st[k], rst[k]))
        a, b = zip(*(pick(p, q, st, rst) for _, p, q, st, rst in pairs))
        a, b = torch.cat([t.flatten() for t in a]), torch.cat([t.flatten() for t in b])
        assert (a - b).norm() <= BF16_UNIT_ROUNDOFF * b.norm(), key
    assert all(float(step.optim.state[p]["step"]) == 3 for p in step.master.masters)
    for c, p in zip(step.master.copies, step.master.masters):
        assert torch.equal(c, p.to(torch.bfloat16))


def test_master_weights_swap_restores_the_parameters(tiny_var_cfg):
    model = VAR(_wide_cfg(tiny_var_cfg))
    opt = adamw(model.parameters(), 1e-3, (0.9, 0.95), 0.0, torch.device("cpu"))
    mw = MasterWeights(model, opt)
    fc1 = model.blocks[0].ffn.fc1
    master = fc1.weight
    with pytest.raises(RuntimeError, match="boom"):
        with mw.swapped():
            assert fc1.weight.dtype == torch.bfloat16 and fc1.weight is not master
            raise RuntimeError("boom")
    assert fc1.weight is master and isinstance(master, torch.nn.Parameter)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in VAR(model.cfg).named_parameters()]


def test_master_weights_follow_weights_loaded_after_the_first_step(tiny_var_cfg):
    """Loading weights into the model after steps ran: the next step computes with them."""
    cfg = _wide_cfg(tiny_var_cfg)
    model = VAR(cfg).train()
    step = TrainStep(model, adamw(model.parameters(), 1e-3, (0.9, 0.95), 0.0, torch.device("cpu")),
                     amp=torch.bfloat16, master_weights=True)
    step(*_batch(cfg, 2, 0))
    other = VAR(cfg).train()
    model.load_state_dict(other.state_dict())
    fresh = TrainStep(other, adamw(other.parameters(), 1e-3, (0.9, 0.95), 0.0, torch.device("cpu")),
                      amp=torch.bfloat16, master_weights=True)
    torch.manual_seed(5)
    loss, _ = step(*_batch(cfg, 2, 1))
    torch.manual_seed(5)
    want, _ = fresh(*_batch(cfg, 2, 1))
    assert torch.equal(loss, want)


def test_master_weights_need_autocast_one_device_and_adamw(tiny_var):
    cpu = torch.device("cpu")

    class Sharded(torch.nn.Module):   # what FSDP looks like to TrainStep
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def clip_grad_norm_(self, max_norm):
            raise AssertionError

    with pytest.raises(ValueError, match="not DDP/FSDP"):
        sharded = Sharded(tiny_var)
        TrainStep(sharded, adamw(sharded.parameters(), 1e-3, (0.9, 0.95), 0.0, cpu), amp=torch.bfloat16,
                  master_weights=True)
    with pytest.raises(ValueError, match="master_weights needs autocast"):
        TrainStep(tiny_var, adamw(tiny_var.parameters(), 1e-3, (0.9, 0.95), 0.0, cpu), master_weights=True)
    with pytest.raises(ValueError, match="master_weights needs autocast"):
        TrainStep(tiny_var, torch.optim.SGD(tiny_var.parameters(), lr=0.1), amp=torch.bfloat16, master_weights=True)


@pytest.mark.parametrize("setting, device, world, fsdp, amp, want", [
    ("auto", "cuda", 1, False, True, True),
    ("auto", "cuda", 1, False, False, False),   # fp32 training: nothing to cast
    ("auto", "cpu", 1, False, True, False),
    ("auto", "cuda", 2, False, True, False),   # DDP reduces registered parameters' gradients only
    ("auto", "cuda", 1, True, True, False),
    (False, "cuda", 1, False, True, False),
])
def test_trainer_master_weights_only_on_one_cuda_worker(setting, device, world, fsdp, amp, want):
    plan = ExecutionPlan(master_weights=setting).resolve(VARConfig(depth=2), device, training=True,
                                                         amp=torch.bfloat16 if amp else None, world=world, fsdp=fsdp)
    assert plan.master_weights is want


def test_a_resumed_run_equals_a_straight_one(monkeypatch):
    """benchmarks/train_step.py --resume-check on the CPU (on a GPU it runs the CUDA graph and
    master weights): 3 steps, the trainer's checkpoint, a fresh model and optimizer loaded from
    it, 3 more steps, against 6 straight steps, with clipping and a changing learning rate."""
    import argparse
    import sys
    from pathlib import Path
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    sys.modules.pop("train_step", None)
    from train_step import resume_check
    rec = resume_check(argparse.Namespace(numerics_depth=1, numerics_batch=2), torch.device("cpu"))
    assert rec["steps"] == 6 and len(rec["loss_straight"]) == 6 and rec["loss_straight"][0] > 8
    assert rec["max_loss_diff"] == 0.0 and rec["max_weight_diff"] == 0.0


def test_the_step_captures_with_a_cublas_workspace_of_its_own(tiny_var_cfg, capture_log):
    """The training step's capture is bracketed by dropping torch's cached cuBLAS workspaces
    (varcore.fast.graphs.own_cublas_workspace), so a second step captured in the same process is not
    handed the first graph's workspace. Checked on the CPU with stand-ins for the CUDA calls."""
    model = VAR(tiny_var_cfg).train()
    step = TrainStep(model, adamw(model.parameters(), 1e-3, (0.9, 0.95), 0.05, torch.device("cpu")))
    batch = _batch(tiny_var_cfg, 2, 0)
    step(*batch, 1e-3)   # the optimizer's state exists before the capture, as after the eager steps
    log = capture_log()
    step._capture(*batch)
    assert log == ["fresh", "capture", "end", "fresh"]
