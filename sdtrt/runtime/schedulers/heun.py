"""Heun: the second-order (trapezoidal) solver of the probability-flow ODE in the VE parametrisation.

Karras, Aittala, Aila & Laine 2022, "Elucidating the Design Space of Diffusion-Based Generative Models",
https://arxiv.org/abs/2206.00364, Algorithm 1 without churn. State ``x = x_t / alpha_t`` at VE noise level ``sigma``,
``d(x, sigma) = (x - x0_hat) / sigma``; one step from ``sigma_j`` to ``sigma_{j+1}`` with ``dt = sigma_{j+1} - sigma_j``:

    d_j      = d(x_j, sigma_j)                                        (evaluation 1)
    x_euler  = x_j + dt * d_j
    x_{j+1}  = x_j + dt * (d_j + d(x_euler, sigma_{j+1})) / 2          (evaluation 2; skipped when sigma_{j+1} = 0)

so ``steps`` steps take ``2 * steps - 1`` UNet evaluations, as diffusers' ``HeunDiscreteScheduler`` runs them (its
timesteps ``[t0, t1, t1, t2, t2, ...]``). Both kinds of evaluation are one row shape, ``x_next = a0 x + a1 out +
a2 saved_x + a3 saved_d``, then ``saved_x = x`` and ``saved_d = e0 x + e1 out``: a first-order row has ``a2 = a3 = 0``,
a second-order row reads what the row before it saved. History (2, *x.shape): ``saved_x``, ``saved_d``.

img2img: diffusers starts Heun at evaluation ``2 * start`` (its ``order`` is 2). Rows are indexed so that the
pipeline's first evaluation is row ``start`` as for every scheduler: the ``start`` rows before it are never run,
and row ``start + k`` is diffusers' evaluation ``2 * start + k`` (``num_evals = 2 * steps - 1 - start``). Parity reference: diffusers ``HeunDiscreteScheduler``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import schedule
from .euler import derivative_coefs, sigma_grid
from .tables import Tables, at, check_finite, f64, timesteps_f32

NAME = "heun"
NEEDS_NOISE = False

DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "clip_sample": False,
    "timestep_spacing": "linspace",
    "steps_offset": 0,
}


@dataclass(frozen=True)
class HeunTables(Tables):
    coef: torch.Tensor  # (E, 4) x_next = a0 x + a1 out + a2 saved_x + a3 saved_d
    save: torch.Tensor  # (E, 2) saved_d = e0 x + e1 out


def make_tables(config: Mapping[str, Any], steps: int, start: int = 0) -> HeunTables:
    cfg = schedule.read_config(config, DEFAULTS, NAME)
    schedule.require_default(cfg, NAME, use_exponential_sigmas=False, use_beta_sigmas=False, clip_sample=False)
    grid = sigma_grid(cfg, steps, NAME, karras=bool(cfg["use_karras_sigmas"]), final="zero")
    s = grid.sigmas  # (steps + 1,), the last 0
    pt = cfg["prediction_type"]

    # diffusers' evaluations: e = 0 first order at s_0; then for j = 1 .. steps-1: second order at s_j (finishing
    # step j-1), first order at s_j.
    rows_t, rows_sigma, coef, save = [grid.timesteps[0]], [s[0]], [], []

    def first_order(j: int) -> None:
        dt = s[j + 1] - s[j]
        d = derivative_coefs(pt, np.array([s[j]]))[0]  # (2,)
        coef.append([1 + dt * d[0], dt * d[1], 0.0, 0.0])
        save.append([d[0], d[1]])

    first_order(0)
    for j in range(1, steps):
        dt = s[j] - s[j - 1]
        d2 = derivative_coefs(pt, np.array([s[j]]))[0]
        coef.append([dt * d2[0] / 2, dt * d2[1] / 2, 1.0, dt / 2])
        save.append([0.0, 0.0])  # never read: the next row is first order
        rows_t.append(grid.timesteps[j])
        rows_sigma.append(s[j])
        first_order(j)
        rows_t.append(grid.timesteps[j])
        rows_sigma.append(s[j])

    skip = start  # row ``start`` is diffusers' evaluation 2 * start; the ``start`` rows in front are never run
    coef_a, save_a = np.asarray(coef)[skip:], np.asarray(save)[skip:]
    sigma_a, t_a = np.asarray(rows_sigma)[skip:], np.asarray(rows_t)[skip:]
    check_finite(NAME, steps, coef=coef_a, save=save_a)
    return HeunTables(
        steps=steps,
        num_evals=len(coef_a),
        timesteps=timesteps_f32(t_a),
        c_in=f64(1 / np.sqrt(sigma_a**2 + 1)),
        init_noise_sigma=grid.init_noise_sigma,
        history_len=2,
        needs_noise=NEEDS_NOISE,
        coef=f64(coef_a),
        save=f64(save_a),
    )


def step(
    tables: HeunTables,
    i: torch.Tensor | int,
    x: torch.Tensor,
    model_output: torch.Tensor,
    history: torch.Tensor,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One Heun evaluation; x, model_output (B, C, H, W), history (2, B, C, H, W) updated in place."""
    a = at(tables.coef, i)  # (4,)
    e = at(tables.save, i)  # (2,)
    x_next = a[0] * x + a[1] * model_output + a[2] * history[0] + a[3] * history[1]
    history[1].copy_(e[0] * x + e[1] * model_output)
    history[0].copy_(x)
    return x_next
