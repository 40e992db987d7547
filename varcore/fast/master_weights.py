"""bf16 working copies of the large linear weights, updated by AdamW from their float32 masters.

Under autocast every step casts each float32 weight matrix to bf16 for its matmuls, and the
bf16 weight gradients back to float32 for the optimizer: 12 bytes of memory traffic per
weight and step that do no arithmetic (about 2% of a paper-scale step). Here the
model's float32 parameters stay the masters (state dicts, checkpoints, evaluation and
sampling see them, and the optimizer state keeps torch's AdamW layout), while the training
step swaps each selected weight for a bf16 copy: the forward reads it without a cast, the
backward leaves a bf16 gradient on it, and one kernel per weight applies AdamW to the
float32 master from that gradient and writes the new bf16 copy.

The function is the autocast step's: autocast would round the same float32 weight to the
same bf16 values, and the weight gradient of a bf16 matmul is a bf16 value that the cast to
float32 keeps exactly. The update is AdamW's (decoupled weight decay, bias corrections),
with the gradient-clipping factor applied inside the kernel in float32.

One device only: data-parallel wrappers reduce the gradients of registered parameters, and
the bf16 copies are not registered.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None

MIN_NUMEL = 1 << 16   # smaller weights (the Cvae -> C embedding) keep the autocast cast


if triton is not None:
    @triton.jit
    def _adamw_kernel(p_ptr, lp_ptr, g_ptr, m_ptr, v_ptr, n, lr_ptr, step_ptr, coef_ptr,
                      beta1, beta2, eps, wd, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        lr = tl.load(lr_ptr)
        step = tl.load(step_ptr)
        g = tl.load(g_ptr + offs, mask=mask).to(tl.float32) * tl.load(coef_ptr)
        p = tl.load(p_ptr + offs, mask=mask)
        m = tl.load(m_ptr + offs, mask=mask)
        v = tl.load(v_ptr + offs, mask=mask)
        p = p * (1 - lr * wd)
        m = m + (1 - beta1) * (g - m)
        v = v * beta2 + (1 - beta2) * g * g
        bc1 = 1 - tl.exp2(step * tl.log2(beta1))
        bc2 = 1 - tl.exp2(step * tl.log2(beta2))
        p = p - tl.div_rn(lr, bc1) * tl.div_rn(m, tl.div_rn(tl.sqrt_rn(v), tl.sqrt_rn(bc2)) + eps)
        tl.store(p_ptr + offs, p, mask=mask)
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
        tl.store(lp_ptr + offs, p.to(lp_ptr.dtype.element_ty), mask=mask)


def selected_linears(model: nn.Module, min_numel: int = MIN_NUMEL) -> list[tuple[str, nn.Linear]]:
    """The linear layers whose weights get bf16 working copies (trainable, at least ``min_numel``)."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and m.weight.requires_grad and m.weight.numel() >= min_numel]


class MasterWeights:
    """bf16 working copies of ``model``'s large linear weights, with ``optim`` (a
    ``torch.optim.AdamW`` over all of the model's parameters) holding their AdamW state.

    ``swapped()`` puts the copies in the model (forward and backward run inside it);
    ``step(coef)`` updates the masters from the copies' gradients (after ``optim.step()``,
    which skips them: their parameters have no gradient) and refreshes the copies.
    """

    def __init__(self, model: nn.Module, optim: torch.optim.Optimizer, dtype: torch.dtype = torch.bfloat16,
                 min_numel: int = MIN_NUMEL):
        group_of = {id(p): g for g in optim.param_groups for p in g["params"]}
        selected = selected_linears(model, min_numel)
        self.modules = [m for _, m in selected]
        self.masters = [m.weight for m in self.modules]
        missing = [n for n, m in selected if id(m.weight) not in group_of]
        if missing:
            raise ValueError(f"master weights: the optimizer does not hold {missing[:3]}")
        self.groups = [group_of[id(p)] for p in self.masters]
        for g in optim.param_groups:
            if g.get("amsgrad") or g.get("maximize"):
                raise ValueError("master weights implement plain AdamW (amsgrad and maximize off)")
        self.optim = optim
        self.copies = [p.detach().to(dtype).requires_grad_() for p in self.masters]
        dev = self.masters[0].device if self.masters else torch.device("cpu")
        self._one = torch.ones((), device=dev)
        self._lr = {id(g): torch.zeros((), device=dev) for g in optim.param_groups}

    def __len__(self) -> int:
        return len(self.masters)

    @torch.no_grad()
    def refresh(self) -> None:
        """Copies from the masters (after loading a checkpoint into the model)."""
        for c, p in zip(self.copies, self.masters):
            c.copy_(p)

    @contextlib.contextmanager
    def swapped(self):
        """The model computes with the bf16 copies (forward and backward inside)."""
        for m, c in zip(self.modules, self.copies):
            m._parameters["weight"] = c
        try:
            yield
        finally:
            for m, p in zip(self.modules, self.masters):
                m._parameters["weight"] = p

    def grads(self) -> list[torch.Tensor]:
        return [c.grad for c in self.copies if c.grad is not None]

    def zero_grad(self) -> None:
        for c in self.copies:
            c.grad = None

    def _state(self, p: torch.Tensor) -> dict:
        st = self.optim.state[p]
        if not st:   # torch's fused AdamW layout, so checkpoints move between the two
            st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return st

    def _lr_tensor(self, g: dict) -> torch.Tensor:
        lr = g["lr"]
        if torch.is_tensor(lr) and lr.device == self._one.device:
            return lr
        buf = self._lr[id(g)]
        buf.fill_(float(lr))
        return buf

    @torch.no_grad()
    def step(self, coef: torch.Tensor | None = None) -> None:
        """AdamW on the masters from the copies' gradients times ``coef`` (clipping), then new copies."""
        coef = self._one if coef is None else coef
        states = [self._state(p) for p in self.masters]
        live = [i for i, c in enumerate(self.copies) if c.grad is not None]
        if not live:
            return
        torch._foreach_add_([states[i]["step"] for i in live], 1.0)
        lrs = {id(g): self._lr_tensor(g) for g in self.optim.param_groups}
        for i in live:
            p, c, st, g = self.masters[i], self.copies[i], states[i], self.groups[i]
            (beta1, beta2), eps, wd = g["betas"], g["eps"], g["weight_decay"]
            adamw_update(p, c, c.grad, st["exp_avg"], st["exp_avg_sq"], st["step"], lrs[id(g)], coef,
                         beta1, beta2, eps, wd)


def adamw_update(p, copy, g, m, v, step, lr, coef, beta1, beta2, eps, wd) -> None:
    """AdamW on float32 ``p, m, v`` from gradient ``g * coef``, then ``copy`` = ``p`` rounded to
    its dtype: one Triton kernel on CUDA, :func:`adamw_reference` elsewhere. ``step`` (count
    including this update), ``lr``, ``coef``: 0-d float32 tensors on ``p``'s device."""
    if p.is_cuda and triton is not None:
        n, block = p.numel(), 2048
        _adamw_kernel[(triton.cdiv(n, block),)](p, copy, g, m, v, n, lr, step, coef, beta1, beta2, eps, wd,
                                                BLOCK=block, num_warps=8)
    else:
        adamw_reference(p, g, m, v, step, lr, coef, beta1, beta2, eps, wd)
        copy.copy_(p)


def adamw_reference(p, g, m, v, step, lr, coef, beta1, beta2, eps, wd) -> None:
    """The kernel's update in torch ops, in place on float32 ``p, m, v`` (``step``, ``lr``,
    ``coef``: 0-d tensors or numbers; ``step`` counts this update)."""
    step, lr, coef = (torch.as_tensor(x, dtype=torch.float32, device=p.device) for x in (step, lr, coef))
    g = g.float() * coef
    p.mul_(1 - lr * wd)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
    p.sub_((lr / bc1) * (m / (v.sqrt() / bc2.sqrt() + eps)))
