"""Euler: the first-order solver of the probability-flow ODE in the VE parametrisation.

Karras, Aittala, Aila & Laine 2022, "Elucidating the Design Space of Diffusion-Based Generative Models",
https://arxiv.org/abs/2206.00364, Algorithm 1 without churn. The sampler state is ``x = x_t / alpha_t`` at VE noise
level ``sigma_i = sqrt((1 - alpha_bar) / alpha_bar)``; the UNet sees ``x / sqrt(sigma_i**2 + 1)`` (``c_in``) and

    d_i     = (x - x0_hat) / sigma_i              (= eps_hat for epsilon prediction)
    x_{i+1} = x + (sigma_{i+1} - sigma_i) * d_i

with ``x0_hat = x / (sigma**2 + 1) - sigma / sqrt(sigma**2 + 1) * v_hat`` for v-prediction. ``sigma_i`` interpolates
the training sigmas at the (possibly fractional) timesteps, or follows Karras' ``rho = 7`` ramp
(``use_karras_sigmas``); the last one is ``0`` or ``sigma_min`` (``final_sigmas_type``).
Parity reference: diffusers ``EulerDiscreteScheduler`` (``s_churn = 0``).
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

NAME = "euler"
NEEDS_NOISE = False

DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "sigma_min": None,
    "sigma_max": None,
    "timestep_spacing": "linspace",
    "timestep_type": "discrete",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
    "final_sigmas_type": "zero",
}


@dataclass(frozen=True)
class EulerTables(Tables):
    coef: torch.Tensor  # (E, 2) x_next = c0 x + c1 out


@dataclass(frozen=True)
class SigmaGrid:
    """The VE sigma ladder shared by Euler, Euler ancestral and LMS."""

    timesteps: np.ndarray  # (E,) UNet timesteps
    sigmas: np.ndarray  # (E + 1,) VE sigmas, the last one 0 or sigma_min
    init_noise_sigma: float


def sigma_grid(cfg: Mapping[str, Any], steps: int, scheduler: str, *, karras: bool, final: str) -> SigmaGrid:
    """diffusers' ``set_timesteps`` of the Euler family: timesteps, sigmas and the initial latent scale."""
    schedule.check_steps(steps, cfg, scheduler)
    alpha_bar = schedule.alphas_cumprod(cfg, scheduler)
    if cfg.get("rescale_betas_zero_snr", False):
        alpha_bar[-1] = 2.0**-24  # diffusers' stand-in for zero terminal SNR (sigma stays finite)
    sigmas_train = schedule.ve_sigmas(alpha_bar)  # (T,) ascending in t
    timesteps = schedule.timesteps_n(cfg, steps, scheduler, rounded=False)
    sigmas = schedule.interp_sigmas(timesteps, sigmas_train)
    if karras:
        sigma_min, sigma_max = schedule.config_sigma_bounds(cfg, sigmas)
        sigmas = schedule.karras_sigmas(sigma_min, sigma_max, steps)
        timesteps = schedule.sigma_to_t(sigmas, np.log(sigmas_train))
    if final == "zero":
        sigma_last = 0.0
    elif final == "sigma_min":
        sigma_last = sigmas_train[0]
    else:
        raise UsageError(f"{scheduler}: final_sigmas_type {final!r} is not supported; use zero or sigma_min")
    sigmas = schedule.as_stored(np.concatenate([sigmas, [sigma_last]]))  # (E + 1,)
    sigma_max = float(sigmas.max())
    leading = cfg["timestep_spacing"] not in ("linspace", "trailing")
    init = float(np.sqrt(sigma_max**2 + 1)) if leading else sigma_max
    return SigmaGrid(timesteps=timesteps, sigmas=sigmas, init_noise_sigma=init)


def derivative_coefs(prediction_type: str, sigma: np.ndarray) -> np.ndarray:
    """(E, 2): ``d = (x - x0_hat) / sigma = d0 * x + d1 * out`` in the VE parametrisation."""
    if prediction_type == "epsilon":
        return np.stack([np.zeros_like(sigma), np.ones_like(sigma)], axis=-1)
    return np.stack([sigma / (sigma**2 + 1), 1 / np.sqrt(sigma**2 + 1)], axis=-1)


def make_tables(config: Mapping[str, Any], steps: int, start: int = 0) -> EulerTables:
    """Row ``i`` depends on nothing before it: img2img's ``start`` changes no row."""
    cfg = schedule.read_config(config, DEFAULTS, NAME)
    schedule.require_default(
        cfg,
        NAME,
        interpolation_type="linear",
        use_exponential_sigmas=False,
        use_beta_sigmas=False,
        timestep_type="discrete",
    )
    grid = sigma_grid(cfg, steps, NAME, karras=bool(cfg["use_karras_sigmas"]), final=cfg["final_sigmas_type"])
    sigma, sigma_next = grid.sigmas[:-1], grid.sigmas[1:]
    d = derivative_coefs(cfg["prediction_type"], sigma)  # (E, 2)
    dt = sigma_next - sigma
    coef = np.stack([1 + dt * d[:, 0], dt * d[:, 1]], axis=-1)
    check_finite(NAME, steps, coef=coef)
    return EulerTables(
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
    tables: EulerTables,
    i: torch.Tensor | int,
    x: torch.Tensor,
    model_output: torch.Tensor,
    history: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One Euler step; x, model_output (B, C, H, W) -> (B, C, H, W). history and noise are unused."""
    c = at(tables.coef, i)  # (2,)
    return c[0] * x + c[1] * model_output
