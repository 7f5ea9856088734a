"""The training noise schedule and the inference timestep grids, on the host in float64.

Symbols (DDPM, Ho et al. 2020, https://arxiv.org/abs/2006.11239; VP/VE views from Karras et al. 2022,
https://arxiv.org/abs/2206.00364):

- ``beta_t``: per-step noise variance of the forward process, ``t = 0 .. T-1``.
- ``alphas_cumprod[t]`` (``alpha_bar_t``): ``prod(1 - beta)``; ``x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps``.
- VP pair: ``alpha_t = sqrt(alpha_bar_t)``, ``sigma_t = sqrt(1 - alpha_bar_t)``; ``lambda_t = log(alpha_t / sigma_t)``.
- VE noise level ``sigma = sigma_t / alpha_t = sqrt((1 - alpha_bar) / alpha_bar)``, so ``lambda = -log(sigma)``;
  the Euler/LMS family steps ``x / alpha_t`` and scales it back by ``alpha_t = 1 / sqrt(sigma**2 + 1)`` before the UNet.

Each grid reproduces diffusers' ``set_timesteps`` of the matching scheduler, formula for formula, so a checkpoint's
``scheduler_config.json`` means the same thing here as there. ``alpha_bar`` is computed exactly as diffusers does it
(float32 betas and cumprod) and widened to float64: that float32 table *is* the reference schedule (it differs from a
float64 cumprod by ~1e-6 relative), and every coefficient derived from it is then computed in float64.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from sdtrt.errors import UsageError

PREDICTION_TYPES = ("epsilon", "v_prediction")


def read_config(config: Mapping[str, Any], defaults: Mapping[str, Any], scheduler: str) -> dict[str, Any]:
    """``defaults`` overlaid with the keys of ``config`` it knows, as diffusers' ``from_config`` does.

    Unknown keys (another scheduler's options, ``_class_name``, ...) are ignored, like in diffusers; a key set to
    ``None`` in the config keeps that meaning (diffusers passes it through too).
    """
    cfg = dict(defaults)
    for key in defaults:
        if key in config:
            cfg[key] = config[key]
    if cfg.get("prediction_type", "epsilon") not in PREDICTION_TYPES:
        raise UsageError(
            f"{scheduler}: prediction_type {cfg['prediction_type']!r} is not supported; use one of {PREDICTION_TYPES}"
        )
    return cfg


def require_default(cfg: Mapping[str, Any], scheduler: str, **supported: Any) -> None:
    """Raise ``UsageError`` for every option set to something other than the one value we implement."""
    for key, value in supported.items():
        if key in cfg and cfg[key] != value:
            raise UsageError(f"{scheduler}: {key}={cfg[key]!r} is not supported (only {value!r})")


def check_steps(steps: int, cfg: Mapping[str, Any], scheduler: str) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UsageError(f"{scheduler}: steps must be a positive integer, got {steps!r}")
    if steps > cfg["num_train_timesteps"]:
        raise UsageError(
            f"{scheduler}: steps={steps} exceeds the {cfg['num_train_timesteps']} training timesteps of the checkpoint"
        )


def _betas_for_alpha_bar(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """The squaredcos_cap_v2 (Nichol & Dhariwal 2021, https://arxiv.org/abs/2102.09672) betas, as diffusers."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), max_beta)
        for i in range(num_train_timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float32)


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023 (https://arxiv.org/abs/2305.08891), Algorithm 1, in float32 like diffusers."""
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt -= last
    alphas_bar_sqrt *= first / (first - last)
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def alphas_cumprod(cfg: Mapping[str, Any], scheduler: str) -> np.ndarray:
    """``alpha_bar_t`` for ``t = 0 .. T-1``, (T,) float64 holding diffusers' float32 values."""
    n = int(cfg["num_train_timesteps"])
    schedule = cfg["beta_schedule"]
    if cfg.get("trained_betas") is not None:
        betas = torch.tensor(cfg["trained_betas"], dtype=torch.float32)
        if betas.shape != (n,):
            raise UsageError(f"{scheduler}: trained_betas has {betas.numel()} values, expected {n}")
    elif schedule == "linear":
        betas = torch.linspace(cfg["beta_start"], cfg["beta_end"], n, dtype=torch.float32)
    elif schedule == "scaled_linear":
        betas = torch.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, n, dtype=torch.float32) ** 2
    elif schedule == "squaredcos_cap_v2":
        betas = _betas_for_alpha_bar(n)
    else:
        raise UsageError(
            f"{scheduler}: beta_schedule {schedule!r} is not supported; use linear, scaled_linear or squaredcos_cap_v2"
        )
    if cfg.get("rescale_betas_zero_snr", False):
        betas = _rescale_zero_terminal_snr(betas)
    return torch.cumprod(1.0 - betas, dim=0).double().numpy()


def as_stored(values: np.ndarray) -> np.ndarray:
    """``values`` rounded to float32 and widened back: diffusers stores its sigma ladders in float32, and the
    first Euler-family step (``sigma = 14.6 -> ...``) is conditioned badly enough that the last float32 bit of
    sigma shows in the result, so the ladder is taken exactly as the reference has it."""
    return np.asarray(values, dtype=np.float32).astype(np.float64)


def ve_sigmas(alpha_bar: np.ndarray) -> np.ndarray:
    """VE noise level ``sigma = sqrt((1 - alpha_bar) / alpha_bar)`` (same shape)."""
    return np.sqrt((1.0 - alpha_bar) / alpha_bar)


def vp_from_ve(sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(alpha_t, sigma_t)`` of the VP process at VE noise level ``sigma`` (``sigma = 0`` gives ``(1, 0)``)."""
    alpha_t = 1.0 / np.sqrt(sigma**2 + 1.0)
    return alpha_t, sigma * alpha_t


def timesteps_n(cfg: Mapping[str, Any], n: int, scheduler: str, *, rounded: bool) -> np.ndarray:
    """The ``n`` descending timesteps of DDIM/PNDM (``rounded``) and Euler/LMS (float64).

    Only ``linspace`` differs: DDIM and PNDM round it to integers, the Euler family keeps fractional (float32)
    timesteps and interpolates sigma between training steps.
    """
    t_train = cfg["num_train_timesteps"]
    spacing = cfg["timestep_spacing"]
    if spacing == "linspace" and rounded:
        return np.linspace(0, t_train - 1, n).round()[::-1].astype(np.float64)
    if spacing == "linspace":
        return np.linspace(0, t_train - 1, n, dtype=np.float32)[::-1].astype(np.float64)
    if spacing == "leading":
        step_ratio = t_train // n
        return (np.arange(0, n) * step_ratio).round()[::-1].astype(np.float64) + cfg["steps_offset"]
    if spacing == "trailing":
        return np.round(np.arange(t_train, 0, -t_train / n)).astype(np.float64) - 1
    raise UsageError(f"{scheduler}: timestep_spacing {spacing!r} is not supported; use leading, trailing or linspace")


def timesteps_multistep(cfg: Mapping[str, Any], n: int, last_timestep: int, scheduler: str) -> np.ndarray:
    """The descending int timesteps of DPM-Solver/UniPC: ``n + 1`` grid points with the last (0) dropped."""
    t_train = cfg["num_train_timesteps"]
    spacing = cfg["timestep_spacing"]
    if spacing == "linspace":
        ts = np.linspace(0, last_timestep - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    elif spacing == "leading":
        step_ratio = last_timestep // (n + 1)
        ts = (np.arange(0, n + 1) * step_ratio).round()[::-1][:-1].astype(np.int64) + cfg["steps_offset"]
    elif spacing == "trailing":
        ts = np.arange(last_timestep, 0, -t_train / n).round().astype(np.int64) - 1
    else:
        raise UsageError(
            f"{scheduler}: timestep_spacing {spacing!r} is not supported; use leading, trailing or linspace"
        )
    return ts.astype(np.float64)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, eq. 5: ``n`` descending sigmas, evenly spaced in ``sigma ** (1 / rho)``."""
    ramp = np.linspace(0, 1, n)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each VE ``sigma``, interpolating linearly in ``log(sigma)`` (as diffusers)."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma[None, :] - log_sigmas[:, None]  # (T, n)
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return (1 - w) * low_idx + w * high_idx


def interp_sigmas(timesteps: np.ndarray, sigmas_train: np.ndarray) -> np.ndarray:
    """VE sigma at (possibly fractional) timesteps, linear in t between training steps."""
    return np.interp(timesteps, np.arange(0, len(sigmas_train)), sigmas_train)


def config_sigma_bounds(cfg: Mapping[str, Any], in_sigmas: np.ndarray) -> tuple[float, float]:
    """``(sigma_min, sigma_max)`` for a Karras ramp: the config's if set, else the ends of ``in_sigmas``."""
    sigma_min = cfg.get("sigma_min")
    sigma_max = cfg.get("sigma_max")
    return (
        float(sigma_min) if sigma_min is not None else float(in_sigmas[-1]),
        float(sigma_max) if sigma_max is not None else float(in_sigmas[0]),
    )


def x0_eps_coefs(prediction_type: str, alpha_t: np.ndarray, sigma_t: np.ndarray) -> np.ndarray:
    """Coefficients turning a model output into ``x0`` and ``eps`` predictions at VP ``(alpha_t, sigma_t)``.

    Returns (..., 4): ``x0 = c0 * x + c1 * out`` and ``eps = c2 * x + c3 * out``, ``x`` the VP sample
    ``alpha_t * x0 + sigma_t * eps``. v-prediction (Salimans & Ho 2022, https://arxiv.org/abs/2202.00512):
    ``v = alpha_t * eps - sigma_t * x0``.
    """
    alpha_t, sigma_t = np.broadcast_arrays(np.asarray(alpha_t, np.float64), np.asarray(sigma_t, np.float64))
    one, zero = np.ones_like(alpha_t), np.zeros_like(alpha_t)
    if prediction_type == "epsilon":
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.stack([1.0 / alpha_t, -sigma_t / alpha_t, zero, one], axis=-1)
    return np.stack([alpha_t, -sigma_t, sigma_t, alpha_t], axis=-1)
