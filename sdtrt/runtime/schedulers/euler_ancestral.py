"""Euler ancestral: an Euler step down to ``sigma_down`` plus fresh noise of std ``sigma_up``.

The ancestral sampler of k-diffusion (Crowson), from Karras et al. 2022, https://arxiv.org/abs/2206.00364, and the
DDPM ancestral step (Ho et al. 2020, https://arxiv.org/abs/2006.11239). VE state ``x = x_t / alpha_t``; stepping from
``sigma`` to ``sigma_next`` splits the variance so that ``sigma_down**2 + sigma_up**2 = sigma_next**2``:

    sigma_up   = sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
    sigma_down = sqrt(sigma_next**2 - sigma_up**2)
    x_next     = x + (sigma_down - sigma) * d + sigma_up * z,     d = (x - x0_hat) / sigma,  z ~ N(0, I)

``z`` is drawn by the pipeline, one per evaluation including the last (where ``sigma_up = 0``), in the order
diffusers draws it. Parity reference: diffusers ``EulerAncestralDiscreteScheduler``.
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

NAME = "euler_a"
NEEDS_NOISE = True

DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
}


@dataclass(frozen=True)
class EulerAncestralTables(Tables):
    coef: torch.Tensor  # (E, 3) x_next = c0 x + c1 out + c2 noise


def make_tables(config: Mapping[str, Any], steps: int, start: int = 0) -> EulerAncestralTables:
    """Row ``i`` depends on nothing before it: img2img's ``start`` changes no row."""
    cfg = schedule.read_config(config, DEFAULTS, NAME)
    grid = sigma_grid(cfg, steps, NAME, karras=False, final="zero")
    sigma, sigma_next = grid.sigmas[:-1], grid.sigmas[1:]
    sigma_up = np.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
    sigma_down = sigma_next**2 / sigma  # = sqrt(sigma_next**2 - sigma_up**2), without the cancellation
    d = derivative_coefs(cfg["prediction_type"], sigma)  # (E, 2)
    dt = sigma_down - sigma
    coef = np.stack([1 + dt * d[:, 0], dt * d[:, 1], sigma_up], axis=-1)
    check_finite(NAME, steps, coef=coef)
    return EulerAncestralTables(
        steps=steps,
        num_evals=len(sigma),
        timesteps=timesteps_f32(grid.timesteps),
        c_in=f64(1 / np.sqrt(sigma**2 + 1)),
        init_noise_sigma=grid.init_noise_sigma,
        history_len=0,
        needs_noise=NEEDS_NOISE,
        coef=f64(coef),
    )


def step(
    tables: EulerAncestralTables,
    i: torch.Tensor | int,
    x: torch.Tensor,
    model_output: torch.Tensor,
    history: torch.Tensor | None,
    noise: torch.Tensor,
) -> torch.Tensor:
    """One ancestral step; x, model_output, noise (B, C, H, W) -> (B, C, H, W). history is unused."""
    c = at(tables.coef, i)  # (3,)
    return c[0] * x + c[1] * model_output + c[2] * noise
