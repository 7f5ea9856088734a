"""DDIM: deterministic (eta = 0) denoising diffusion implicit models.

Song, Meng & Ermon 2020, "Denoising Diffusion Implicit Models", https://arxiv.org/abs/2010.02502, eq. 12 with
``sigma_t = 0``. With ``alpha_bar`` the cumulative product of the training schedule, at timestep ``t`` stepping to
``t_prev``:

    x0_hat   = (x_t - sqrt(1 - alpha_bar_t) * eps_hat) / sqrt(alpha_bar_t)
    x_{prev} = sqrt(alpha_bar_prev) * x0_hat + sqrt(1 - alpha_bar_prev) * eps_hat

``alpha_bar_prev`` of the last step is ``1`` (``set_alpha_to_one``) or ``alpha_bar_0``. ``t_prev = t - T // steps``
as diffusers has it, for every spacing. ``clip_sample`` clamps ``x0_hat`` to ``[-clip_sample_range, range]``, a code
path chosen in ``make_tables``. Parity reference: diffusers ``DDIMScheduler`` (eta = 0).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import schedule
from .tables import Tables, at, check_finite, f64, timesteps_f32

NAME = "ddim"
NEEDS_NOISE = False

DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "prediction_type": "epsilon",
    "thresholding": False,
    "timestep_spacing": "leading",
    "rescale_betas_zero_snr": False,
}


@dataclass(frozen=True)
class DDIMTables(Tables):
    pred: torch.Tensor  # (E, 4) x0 = p0 x + p1 out, eps = p2 x + p3 out
    coef: torch.Tensor  # (E, 2) x_prev = c0 x0 + c1 eps: (sqrt(alpha_bar_prev), sqrt(1 - alpha_bar_prev))
    clip_sample_range: float | None  # clamp x0 to +-range; None: no clipping


def make_tables(config: Mapping[str, Any], steps: int, start: int = 0) -> DDIMTables:
    """Row ``i`` depends on nothing before it: img2img's ``start`` changes no row."""
    cfg = schedule.read_config(config, DEFAULTS, NAME)
    schedule.require_default(cfg, NAME, thresholding=False)
    schedule.check_steps(steps, cfg, NAME)
    alpha_bar = schedule.alphas_cumprod(cfg, NAME)
    final_alpha_bar = 1.0 if cfg["set_alpha_to_one"] else alpha_bar[0]

    t = schedule.timesteps_n(cfg, steps, NAME, rounded=True).astype(np.int64)  # (E,)
    t_prev = t - cfg["num_train_timesteps"] // steps
    a_t = alpha_bar[t]
    a_prev = np.where(t_prev >= 0, alpha_bar[np.maximum(t_prev, 0)], final_alpha_bar)

    pred = schedule.x0_eps_coefs(cfg["prediction_type"], np.sqrt(a_t), np.sqrt(1.0 - a_t))
    coef = np.stack([np.sqrt(a_prev), np.sqrt(1.0 - a_prev)], axis=-1)
    check_finite(NAME, steps, pred=pred, coef=coef)
    return DDIMTables(
        steps=steps,
        num_evals=len(t),
        timesteps=timesteps_f32(t),
        c_in=f64(np.ones(len(t))),
        init_noise_sigma=1.0,
        history_len=0,
        needs_noise=NEEDS_NOISE,
        pred=f64(pred),
        coef=f64(coef),
        clip_sample_range=float(cfg["clip_sample_range"]) if cfg["clip_sample"] else None,
    )


def step(
    tables: DDIMTables,
    i: torch.Tensor | int,
    x: torch.Tensor,
    model_output: torch.Tensor,
    history: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One DDIM step; x, model_output (B, C, H, W) -> x_prev (B, C, H, W). history and noise are unused."""
    p = at(tables.pred, i)  # (4,)
    c = at(tables.coef, i)  # (2,)
    x0 = p[0] * x + p[1] * model_output
    eps = p[2] * x + p[3] * model_output
    if tables.clip_sample_range is not None:  # static: fixed by make_tables, not by tensor values
        x0 = x0.clamp(-tables.clip_sample_range, tables.clip_sample_range)
    return c[0] * x0 + c[1] * eps
