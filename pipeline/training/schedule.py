"""Schedules of a training run, pure functions of the step: the batch each worker takes, the
random seed of each step, the learning rate and the evaluation points.

Determinism is by construction, so that N workers follow the trajectory of one worker with the
same global batch and a resumed run the trajectory of an uninterrupted one: the global batch of
step ``s`` is a fixed slice of a permutation seeded by (seed, epoch), worker ``r`` of ``W`` takes
rows ``[r B/W, (r+1) B/W)`` of it (DDP averages the gradients: the gradient of the global-batch
mean loss), and the random state (class dropout, drop-path) is re-seeded every step from
(seed, step, rank), so nothing random has to be checkpointed.
"""

from __future__ import annotations

import math

import numpy as np


def global_batch_indices(num_train: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Rows of the global batch of ``step``: epoch ``e`` walks a permutation seeded by (seed, e)."""
    steps_per_epoch = num_train // batch_size
    epoch, i = divmod(step, steps_per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(num_train)
    return perm[i * batch_size:(i + 1) * batch_size]


def rank_slice(indices: np.ndarray, rank: int, world: int) -> np.ndarray:
    b = len(indices) // world
    return indices[rank * b:(rank + 1) * b]


def step_seed(seed: int, step: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def eval_steps(total_steps: int, num_evals: int, spacing: str = "log") -> list[int]:
    """Evaluation steps ending at the last step. ``log``: each at twice the compute of the
    previous one, which gives the loss-vs-compute curve (and its Pareto frontier C_min) equal
    weight per octave; ``linear``: every ``total / num_evals`` steps."""
    if spacing == "linear":
        steps = {max(1, round(total_steps * (j + 1) / num_evals)) for j in range(num_evals)}
    else:
        steps = {max(1, round(total_steps / 2 ** j)) for j in range(num_evals)}
    return sorted(steps)


def lr_at(step: int, total_steps: int, peak: float, warmup_frac: float, decay: str, min_frac: float) -> float:
    """Linear warm-up from ~0 to ``peak`` then linear or cosine decay to ``min_frac * peak``.
    ``step`` is 0-based (the lr used for the update that makes ``step + 1``)."""
    warm = round(warmup_frac * total_steps)
    if step < warm:
        return peak * (step + 1) / warm
    t = (step - warm) / max(1, total_steps - warm - 1)
    t = min(max(t, 0.0), 1.0)
    shape = 1.0 - t if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * t))
    return peak * (min_frac + (1.0 - min_frac) * shape)
