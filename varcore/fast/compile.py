"""``torch.compile`` and activation checkpointing, applied to built modules from outside.

:func:`compile_forward` routes a module's calls through one compiled function of its class's
``forward``: dynamo keys compiled code by the function, and the blocks of a model share their
class, structure and shapes (their parameters are graph inputs), so one graph serves every
block. :func:`checkpoint_forward` recomputes a module's forward in backward. Both set the
module's own ``forward`` attribute (state dict and parameters are untouched), as does
:func:`use_forward` (an equivalent forward, uncompiled); :func:`restore_forward` undoes them; a
deep copy of the module keeps them, rebound to the copy.
"""

from __future__ import annotations

import functools
import types

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from . import flex

COMPILE_BACKEND = "inductor"   # tests switch to "aot_eager" (same graphs, no code generation)
# Inductor options of the tuned regions (training blocks, head and loss): coordinate-descent
# tuning times block sizes of the generated element-wise and reduction kernels at compile
# time (longer compile, faster kernels).
TUNED_OPTIONS = {"coordinate_descent_tuning": True}
# Graphs one region may hold. Dynamo keys compiled code by the function's code object, so
# every model width, batch size and mode (training, sampling, eval) that goes through a
# region counts against one limit; torch's default of 8 is reached by sampling three
# depths at two batch sizes in one process, after which the region silently runs eagerly.
REGION_RECOMPILE_LIMIT = 64


@functools.cache
def compile_region(fn, dynamic: bool | None = False, tuned: bool = False, graphs: bool = False):
    """``fn`` through ``torch.compile``, once per (fn, dynamic, tuned, graphs); ``tuned`` adds
    :data:`TUNED_OPTIONS` under inductor; ``graphs`` has inductor replay each shape's kernels as a
    CUDA graph (a call's outputs are then overwritten by the next call: copy what you keep).
    Every region gets :func:`varcore.fast.flex.compile_options`
    (flex's backward tiles for the block mask). Calls run with dynamo's recompile limit raised to
    :data:`REGION_RECOMPILE_LIMIT` (scoped to the call). ``dynamic=None``: the first shape compiles
    static, a second one marks the changing sizes dynamic (sampling: one graph for scales 2..K)."""
    options = None
    if COMPILE_BACKEND == "inductor":
        options = {**flex.compile_options(), **(TUNED_OPTIONS if tuned else {}),
                   **({"triton.cudagraphs": True} if graphs else {})} or None
    compiled = torch.compile(fn, dynamic=dynamic, backend=COMPILE_BACKEND, options=options)

    @functools.wraps(fn)
    def run(*args, **kwargs):
        with torch._dynamo.config.patch(recompile_limit=REGION_RECOMPILE_LIMIT):
            return compiled(*args, **kwargs)
    return run


def _set_forward(module: nn.Module, fn) -> None:
    """``module.forward = fn(module, ...)``, as a bound method (a deep copy rebinds it to the copy)."""
    module.forward = types.MethodType(fn, module)


def _unbound_forward(module: nn.Module):
    """The function behind ``module.forward``: a plan's wrapper, or the class's own."""
    f = module.__dict__.get("forward")
    return f.__func__ if f is not None else type(module).forward


def compile_forward(module: nn.Module, dynamic: bool | None = False, tuned: bool = False, fn=None) -> None:
    """Run ``module`` through one compiled function shared by every module of its class: its
    class's ``forward``, or ``fn(module, ...)``, an equivalent forward (e.g. one through kernels)."""
    _set_forward(module, compile_region(fn or type(module).forward, dynamic, tuned))


def use_forward(module: nn.Module, fn) -> None:
    """Run ``module`` through ``fn(module, ...)``, an equivalent forward, uncompiled."""
    _set_forward(module, fn)


def _checkpointed(inner, module: nn.Module, *args, **kwargs):
    if module.training and torch.is_grad_enabled():
        return checkpoint(inner, module, *args, use_reentrant=False, **kwargs)
    return inner(module, *args, **kwargs)


def checkpoint_forward(module: nn.Module) -> None:
    """Recompute ``module``'s forward (as it is now: compiled or not) in backward, in training."""
    _set_forward(module, functools.partial(_checkpointed, _unbound_forward(module)))


def restore_forward(module: nn.Module) -> None:
    """Undo :func:`compile_forward` / :func:`checkpoint_forward`: the class's plain forward."""
    module.__dict__.pop("forward", None)
