"""DDIM: denoising diffusion implicit models, deterministic (eta = 0) or with step noise (eta > 0).

Song, Meng & Ermon 2020, "Denoising Diffusion Implicit Models", https://arxiv.org/abs/2010.02502, eq. 12 and 16.
With ``alpha_bar`` the cumulative product of the training schedule, at timestep ``t`` stepping to ``t_prev``:

    x0_hat   = (x_t - sqrt(1 - alpha_bar_t) * eps_hat) / sqrt(alpha_bar_t)
    sigma_t  = eta * sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev))
    x_{prev} = sqrt(alpha_bar_prev) * x0_hat + sqrt(1 - alpha_bar_prev - sigma_t**2) * eps_hat + sigma_t * z

``z ~ N(0, I)`` is drawn by the pipeline before the loop, one per step (diffusers draws it inside ``step`` from the
pipeline's generator when ``eta > 0``); with ``eta = 0`` there is no noise and the step is the deterministic one.

``alpha_bar_prev`` of the last step is ``1`` (``set_alpha_to_one``) or ``alpha_bar_0``. ``t_prev = t - T // steps``
as diffusers has it, for every spacing. ``clip_sample`` clamps ``x0_hat`` to ``[-clip_sample_range, range]``, a code
path chosen in ``make_tables``. Parity reference: diffusers ``DDIMScheduler`` (``step(..., eta=eta)``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sdtrt.errors import UsageError

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
    "eta": 0.0,  # not a diffusers config key: diffusers takes eta per call; sdtrt's "ddim:eta=X" names pin it
}


@dataclass(frozen=True)
class DDIMTables(Tables):
    pred: torch.Tensor  # (E, 4) x0 = p0 x + p1 out, eps = p2 x + p3 out
    coef: torch.Tensor  # (E, 3) x_prev = c0 x0 + c1 eps + c2 z: (sqrt(a_prev), sqrt(1 - a_prev - s^2), s = sigma_t)
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
    eta = cfg["eta"]
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 <= eta <= 1:
        raise UsageError(f"{NAME}: eta must be a number between 0 and 1, got {eta!r}")
    std = eta * np.sqrt((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev))  # sigma_t of eq. 16

    pred = schedule.x0_eps_coefs(cfg["prediction_type"], np.sqrt(a_t), np.sqrt(1.0 - a_t))
    coef = np.stack([np.sqrt(a_prev), np.sqrt(1.0 - a_prev - std**2), std], axis=-1)
    check_finite(NAME, steps, pred=pred, coef=coef)
    return DDIMTables(
        steps=steps,
        num_evals=len(t),
        timesteps=timesteps_f32(t),
        c_in=f64(np.ones(len(t))),
        init_noise_sigma=1.0,
        history_len=0,
        needs_noise=eta > 0,
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
    """One DDIM step; x, model_output, noise (B, C, H, W) -> x_prev (B, C, H, W). history is unused; noise is
    read only when the tables were made with eta > 0."""
    p = at(tables.pred, i)  # (4,)
    c = at(tables.coef, i)  # (2,)
    x0 = p[0] * x + p[1] * model_output
    eps = p[2] * x + p[3] * model_output
    if tables.clip_sample_range is not None:  # static: fixed by make_tables, not by tensor values
        x0 = x0.clamp(-tables.clip_sample_range, tables.clip_sample_range)
    x_prev = c[0] * x0 + c[1] * eps
    if tables.needs_noise:  # static: fixed by make_tables (eta > 0), not by tensor values
        x_prev = x_prev + c[2] * noise
    return x_prev
