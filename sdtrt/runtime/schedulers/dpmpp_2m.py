"""DPM-Solver++(2M): second-order multistep solver of the diffusion ODE in data (x0) prediction.

Lu, Zhou, Bao, Chen, Li & Zhu 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
Models", https://arxiv.org/abs/2211.01095, Algorithm 2. VP ``alpha_t = sqrt(alpha_bar)``, ``sigma_t``,
``lambda_t = log(alpha_t / sigma_t)``; stepping from ``s0`` to ``t`` with ``h = lambda_t - lambda_s0``,
``r0 = (lambda_s0 - lambda_s1) / h`` and ``m`` the x0 predictions:

    D0 = m_{s0},  D1 = (m_{s0} - m_{s1}) / r0
    x_t = (sigma_t / sigma_s0) x_s0 - alpha_t (exp(-h) - 1) (D0 + D1 / 2)                       (midpoint)
    x_t = (sigma_t / sigma_s0) x_s0 - alpha_t (exp(-h) - 1) D0 + alpha_t ((exp(-h) - 1) / h + 1) D1   (heun)

The first step, and the last one when ``lower_order_final`` applies (always for a final sigma of 0, where the
update is exactly ``x_t = m``), are first order (``D1 = 0``): rows of the tables. ``exp(-h)`` is computed as the VE
sigma ratio ``sigma_t / sigma_s0`` so the final ``h = inf`` step needs no special case.
History (1, *x.shape): the previous ``m``. Karras sigmas (``use_karras_sigmas``) give "DPM++ 2M Karras",
``use_exponential_sigmas`` A1111's "Exponential" schedule type.
Parity reference: diffusers ``DPMSolverMultistepScheduler`` (``algorithm_type="dpmsolver++"``, order 1 or 2).
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

NAME = "dpmpp_2m"
NEEDS_NOISE = False

DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "solver_order": 2,
    "prediction_type": "epsilon",
    "thresholding": False,
    "algorithm_type": "dpmsolver++",
    "solver_type": "midpoint",
    "lower_order_final": True,
    "euler_at_final": False,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_lu_lambdas": False,
    "use_flow_sigmas": False,
    "final_sigmas_type": "zero",
    "lambda_min_clipped": -float("inf"),
    "variance_type": None,
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
    "use_dynamic_shifting": False,
}


@dataclass(frozen=True)
class DPMTables(Tables):
    pred: torch.Tensor  # (E, 2) m = p0 x + p1 out (x0 prediction)
    coef: torch.Tensor  # (E, 3) x_next = c0 x + c1 m + c2 m_prev


def multistep_grid(
    cfg: Mapping[str, Any], steps: int, scheduler: str, *, unipc: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """diffusers' DPM-Solver (or, ``unipc``, UniPC) ``set_timesteps``: (E,) timesteps and (E + 1,) VE sigmas.

    The two differ only with Karras sigmas: UniPC always rounds the timesteps and its ``sigma_min`` final sigma is
    the end of the ramp rather than the training schedule's first sigma.
    """
    schedule.check_steps(steps, cfg, scheduler)
    alpha_bar = schedule.alphas_cumprod(cfg, scheduler)
    if cfg["rescale_betas_zero_snr"]:
        alpha_bar[-1] = 2.0**-24  # diffusers' stand-in for zero terminal SNR
    sigmas_train = schedule.ve_sigmas(alpha_bar)  # (T,)
    lambda_train = -np.log(sigmas_train)  # (T,) decreasing in t
    clipped = np.searchsorted(lambda_train[::-1], cfg.get("lambda_min_clipped", -np.inf), side="left")
    timesteps = schedule.timesteps_multistep(cfg, steps, cfg["num_train_timesteps"] - int(clipped), scheduler)
    if cfg["use_karras_sigmas"]:
        sigma_min, sigma_max = schedule.config_sigma_bounds(cfg, sigmas_train[::-1])
        sigmas = schedule.karras_sigmas(sigma_min, sigma_max, steps)
        timesteps = schedule.sigma_to_t(sigmas, np.log(sigmas_train))
        if unipc or cfg["beta_schedule"] != "squaredcos_cap_v2":
            timesteps = timesteps.round()
        # diffusers stores timesteps as int64: the unrounded (cosine) ones reach the UNet truncated
        timesteps = np.trunc(timesteps)
        sigma_min_final = sigmas[-1] if unipc else sigmas_train[0]
    elif cfg.get("use_exponential_sigmas"):
        # evenly spaced in log(sigma) (k-diffusion's get_sigmas_exponential); timesteps unrounded, then truncated
        sigma_min, sigma_max = schedule.config_sigma_bounds(cfg, sigmas_train[::-1])
        sigmas = np.exp(np.linspace(np.log(sigma_max), np.log(sigma_min), steps))
        timesteps = np.trunc(schedule.sigma_to_t(sigmas, np.log(sigmas_train)))
        sigma_min_final = sigmas_train[0]
    else:
        sigmas = schedule.interp_sigmas(timesteps, sigmas_train)
        sigma_min_final = sigmas_train[0]
    final = cfg["final_sigmas_type"]
    if final not in ("zero", "sigma_min"):
        raise UsageError(f"{scheduler}: final_sigmas_type {final!r} is not supported; use zero or sigma_min")
    sigma_last = 0.0 if final == "zero" else sigma_min_final
    return timesteps, schedule.as_stored(np.concatenate([sigmas, [sigma_last]]))


def make_tables(config: Mapping[str, Any], steps: int, start: int = 0) -> DPMTables:
    """DPM-Solver++ tables; from evaluation ``start`` on (img2img) the first step is first order again, as
    diffusers' ``lower_order_nums`` restarts after ``set_timesteps`` (the final-step rule still counts all steps)."""
    cfg = schedule.read_config(config, DEFAULTS, NAME)
    if cfg["algorithm_type"] == "deis":  # diffusers maps it to dpmsolver++ as well
        cfg["algorithm_type"] = "dpmsolver++"
    if cfg["solver_type"] in ("logrho", "bh1", "bh2"):  # diffusers maps these to midpoint
        cfg["solver_type"] = "midpoint"
    schedule.require_default(
        cfg,
        NAME,
        algorithm_type="dpmsolver++",
        thresholding=False,
        use_beta_sigmas=False,
        use_lu_lambdas=False,
        use_flow_sigmas=False,
        variance_type=None,
        use_dynamic_shifting=False,
    )
    if cfg["solver_order"] not in (1, 2):
        raise UsageError(f"{NAME}: solver_order={cfg['solver_order']} is not supported (1 or 2)")
    if cfg["solver_type"] not in ("midpoint", "heun"):
        raise UsageError(f"{NAME}: solver_type {cfg['solver_type']!r} is not supported; use midpoint or heun")

    timesteps, sigmas = multistep_grid(cfg, steps, NAME)
    evals = len(timesteps)
    alpha, sigma_vp = schedule.vp_from_ve(sigmas)  # (E + 1,) each
    pred = schedule.x0_eps_coefs(cfg["prediction_type"], alpha[:-1], sigma_vp[:-1])[:, :2]

    coef = np.zeros((evals, 3))
    with np.errstate(divide="ignore", invalid="ignore"):
        for i in range(evals):
            lower_final = i == evals - 1 and (
                cfg["euler_at_final"] or (cfg["lower_order_final"] and evals < 15) or cfg["final_sigmas_type"] == "zero"
            )
            second = cfg["solver_order"] == 2 and i >= start + 1 and not lower_final
            exp_neg_h = sigmas[i + 1] / sigmas[i]  # exp(lambda_s0 - lambda_t) in the VE view
            phi = alpha[i + 1] * (exp_neg_h - 1.0)  # alpha_t (exp(-h) - 1)
            coef[i, 0] = sigma_vp[i + 1] / sigma_vp[i]
            coef[i, 1] = -phi
            if second:
                h = np.log(sigmas[i] / sigmas[i + 1])
                r0 = np.log(sigmas[i - 1] / sigmas[i]) / h
                if cfg["solver_type"] == "midpoint":
                    d1 = -0.5 * phi  # weight of D1
                else:
                    d1 = alpha[i + 1] * ((exp_neg_h - 1.0) / h + 1.0)
                coef[i, 1] += d1 / r0
                coef[i, 2] = -d1 / r0
    check_finite(NAME, steps, pred=pred, coef=coef)
    return DPMTables(
        steps=steps,
        num_evals=evals,
        timesteps=timesteps_f32(timesteps),
        c_in=f64(np.ones(evals)),
        init_noise_sigma=1.0,
        history_len=1,
        needs_noise=NEEDS_NOISE,
        pred=f64(pred),
        coef=f64(coef),
    )


def step(
    tables: DPMTables,
    i: torch.Tensor | int,
    x: torch.Tensor,
    model_output: torch.Tensor,
    history: torch.Tensor,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One DPM-Solver++ step; x, model_output (B, C, H, W), history (1, B, C, H, W) updated in place."""
    p = at(tables.pred, i)  # (2,)
    c = at(tables.coef, i)  # (3,)
    m = p[0] * x + p[1] * model_output  # x0 prediction
    x_next = c[0] * x + c[1] * m + c[2] * history[0]
    history[0].copy_(m)
    return x_next
