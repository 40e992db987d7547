"""Where a bf16 training step loses accuracy: each parameter group's gradient against float64's.

The loss-curve check (``train_step.py --numerics``) says how far a bf16 path's curve drifts from
float32's, not which gradient carries the difference. Here one fixed batch goes through the model
in float64 (the reference: plain execution plan, no autocast), and through each arm, an execution
plan under autocast (or in float32), from the same weights; for every parameter group (block
index removed from the name) one JSON line per arm gives

- ``rel_err``: ``|g - g64| / |g64|`` over the group;
- ``along``: ``<g - g64, g64> / |g64|^2``, the error's component along the true gradient. A
  rounding that is unbiased leaves it near 0 (much smaller than ``rel_err``); a gradient that is
  systematically shrunk, as from rounding towards zero or a lost term, shows as a negative value
  of the size of ``rel_err``.

The weights are the initial ones, and (``--after``) those after that many float64 AdamW steps on
the same batch, where the modulation and the gates are no longer at their initial values.

    PYTHONPATH=. python benchmarks/grad_error.py                       # d16, B=16, norm plain and fused
    PYTHONPATH=. python benchmarks/grad_error.py --arm fused:fused:fp32   # an arm is tag:norm:amp
    PYTHONPATH=. python benchmarks/grad_error.py --arm eager:plain:bf16:compile=false \
        --arm dense:plain:bf16:attention=dense     # more plan fields after a fourth colon

Eager bf16 (``compile=false``) is how the official code trains. Inductor's compiled composition
skips the roundings to bf16 that fall inside the kernels it fuses, so the plain compiled path is
more accurate than the program it compiles; with ``TORCHINDUCTOR_EMULATE_PRECISION_CASTS=1`` it
keeps them, and errs as eager does (RESULTS.md round 20). ``--residual-dtype float32`` takes the
stream's roundings out of every arm.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_utils import emit, env  # noqa: E402
from train_step import PLAIN, batch_of, build  # noqa: E402
from varcore.step import var_loss  # noqa: E402

AMPS = {"bf16": torch.bfloat16, "fp32": None}
BLOCK = re.compile(r"^blocks\.(\d+)\.")   # a block's parameter, with the block's index


def parse_arm(spec: str) -> tuple[str, dict, str]:
    """``tag:norm:amp[:field=value,...]`` -> (tag, execution-plan choices, amp name); values
    ``true``/``false`` are booleans (``compile=false``), others strings (``attention=dense``)."""
    parts = spec.split(":")
    if len(parts) not in (3, 4) or parts[2] not in AMPS:
        raise ValueError(f"--arm must be tag:norm:amp[:field=value,...] with amp in {sorted(AMPS)}, got {spec!r}")
    tag, norm, amp = parts[:3]
    choices = {"norm": norm, "cuda_graph": False, "master_weights": False}
    for item in (parts[3].split(",") if len(parts) == 4 else []):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--arm {spec!r}: plan fields are field=value, got {item!r}")
        choices[key] = {"true": True, "false": False}.get(value, value)
    return tag, choices, amp


def group_of(name: str) -> str:
    """A parameter's group: its name with the block index removed (``blocks.3.attn.proj.weight``
    -> ``blocks.attn.proj.weight``)."""
    return BLOCK.sub("blocks.", name)


def gradients(model: torch.nn.Module, data, amp: torch.dtype | None) -> tuple[float, dict[str, torch.Tensor]]:
    """The loss and every parameter's gradient (float64 copies) of one forward and backward."""
    label_B, x_BlCvae, target_BL = data
    model.zero_grad(set_to_none=True)
    with torch.autocast(x_BlCvae.device.type, dtype=amp) if amp is not None else contextlib.nullcontext():
        logits_BLV = model(label_B, x_BlCvae.to(next(model.parameters()).dtype))
    loss = var_loss(logits_BLV, target_BL)
    loss.backward()
    return loss.item(), {n: p.grad.detach().double().clone() for n, p in model.named_parameters()
                         if p.grad is not None}


def compare(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Per group, per block (``block.<i>``: all of block i's parameters, so an error that grows
    towards the input shows) and over all parameters: ``rel_err``, ``along`` (module docstring)
    and the reference's norm."""
    sums: dict[str, list[float]] = {}
    for name, g64 in want.items():
        d = got[name] - g64
        block = BLOCK.match(name)
        for key in (group_of(name), "all") + ((f"block.{block.group(1)}",) if block else ()):
            s = sums.setdefault(key, [0.0, 0.0, 0.0])
            s[0] += float((d * d).sum())
            s[1] += float((d * g64).sum())
            s[2] += float((g64 * g64).sum())
    return {k: {"rel_err": sig((e / r) ** 0.5) if r else None, "along": sig(a / r) if r else None,
                "norm": sig(r ** 0.5)} for k, (e, a, r) in sums.items()}


def sig(x: float) -> float:
    """Three significant digits (errors span 1e-9 in float32 to 1e-2 in bf16)."""
    return float(f"{x:.3g}")


def reference(depth: int, B: int, device: torch.device, after: int, lr: float, seed: int):
    """The float64 model at its initial weights and after ``after`` AdamW steps on the batch:
    ``[(step, weights, loss, gradients)]``, and the batch."""
    torch.manual_seed(seed)
    model, _, _ = build(depth, B, device, PLAIN, amp=None, drop_path_rate=0.0, cond_drop_rate=0.0)
    model = model.double()
    data = batch_of(model.cfg, B, device, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.05)
    out = []
    for step in range(after + 1):
        loss, g = gradients(model, data, None)
        if step in (0, after):
            out.append((step, {k: v.detach().clone() for k, v in model.state_dict().items()}, loss, g))
        if step < after:
            opt.step()
    return out, data


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=16)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--after", type=int, default=20, help="float64 AdamW steps before the second comparison")
    ap.add_argument("--lr", type=float, default=3e-4, help="their learning rate (train_step.py --numerics' own)")
    ap.add_argument("--arm", action="append", default=[],
                    help="tag:norm:amp[:field=value,...], norm in auto/plain/fused, amp in bf16/fp32, "
                         "plan fields e.g. compile=false,attention=dense "
                         "(default: plain:plain:bf16 and fused:fused:bf16)")
    ap.add_argument("--residual-dtype", default="autocast", choices=["autocast", "float32"],
                    help="the arms' VARConfig.residual_dtype (the stream's dtype under autocast)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        arms = [parse_arm(a) for a in (args.arm or ["plain:plain:bf16", "fused:fused:bf16"])]
    except ValueError as e:
        ap.error(str(e))
    points, data = reference(args.depth, args.batch, device, args.after, args.lr, args.seed)
    for tag, choices, amp_name in arms:
        amp = AMPS[amp_name]
        model, _, plan = build(args.depth, args.batch, device, choices, amp=amp, drop_path_rate=0.0,
                               cond_drop_rate=0.0, residual_dtype=args.residual_dtype)
        for step, weights, loss64, g64 in points:
            model.load_state_dict(weights)
            loss, g = gradients(model, data, amp)
            emit({"bench": "grad_error", "arm": tag, "norm": plan.norm, "amp": amp_name,
                  "residual_dtype": args.residual_dtype, "depth": args.depth,
                  "batch": args.batch, "step": step, "plan": plan.as_dict(), "loss": round(loss, 6),
                  "loss_float64": round(loss64, 6), "groups": compare(g, g64), **env()})


if __name__ == "__main__":
    main()
