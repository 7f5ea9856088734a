"""DPM-Solver++(2M) SDE: the second-order multistep solver of the diffusion SDE in data (x0) prediction.

Lu, Zhou, Bao, Chen, Li & Zhu 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
Models", https://arxiv.org/abs/2211.01095, section 5 (SDE variant). Symbols as in ``dpmpp_2m``: VP ``alpha_t``,
``sigma_t``, ``h = lambda_t - lambda_s0``, ``r0 = (lambda_s0 - lambda_s1) / h``, ``D0 = m_{s0}``,
``D1 = (m_{s0} - m_{s1}) / r0``, ``z ~ N(0, I)``:

    x_t = (sigma_t / sigma_s0) exp(-h) x_s0 + alpha_t (1 - exp(-2h)) D0 + w1 D1 + sigma_t sqrt(1 - exp(-2h)) z
    w1  = alpha_t (1 - exp(-2h)) / 2                         (midpoint)
    w1  = alpha_t ((1 - exp(-2h)) / (-2h) + 1)               (heun)

The first step, and the last one under ``lower_order_final`` (always for a final sigma of 0, where the update is
exactly ``x_t = m``), are first order (``D1 = 0``): rows of the tables, restarted at img2img's ``start``. ``z`` is
drawn by the pipeline before the loop, one per step in diffusers' order (its ``step`` draws one from the pipeline's
generator every step, the last included). History (1, *x.shape): the previous ``m``.
Parity reference: diffusers ``DPMSolverMultistepScheduler`` (``algorithm_type="sde-dpmsolver++"``, order 1 or 2).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sdtrt.errors import UsageError

from . import dpmpp_2m, schedule
from .tables import Tables, at, check_finite, f64, timesteps_f32

NAME = "dpmpp_2m_sde"
NEEDS_NOISE = True
DEFAULTS: dict[str, Any] = {**dpmpp_2m.DEFAULTS, "algorithm_type": "sde-dpmsolver++"}


@dataclass(frozen=True)
class DPMSDETables(Tables):
    pred: torch.Tensor  # (E, 2) m = p0 x + p1 out (x0 prediction)
    coef: torch.Tensor  # (E, 4) x_next = c0 x + c1 m + c2 m_prev + c3 z


def make_tables(config: Mapping[str, Any], steps: int, start: int = 0) -> DPMSDETables:
    """SDE-DPM-Solver++ tables; from evaluation ``start`` on (img2img) the first step is first order again."""
    cfg = schedule.read_config(config, DEFAULTS, NAME)
    if cfg["solver_type"] in ("logrho", "bh1", "bh2"):  # diffusers maps these to midpoint
        cfg["solver_type"] = "midpoint"
    schedule.require_default(
        cfg,
        NAME,
        algorithm_type="sde-dpmsolver++",
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

    timesteps, sigmas = dpmpp_2m.multistep_grid(cfg, steps, NAME)
    evals = len(timesteps)
    alpha, sigma_vp = schedule.vp_from_ve(sigmas)  # (E + 1,) each
    pred = schedule.x0_eps_coefs(cfg["prediction_type"], alpha[:-1], sigma_vp[:-1])[:, :2]

    coef = np.zeros((evals, 4))
    with np.errstate(divide="ignore", invalid="ignore"):
        for i in range(evals):
            lower_final = i == evals - 1 and (
                cfg["euler_at_final"] or (cfg["lower_order_final"] and evals < 15) or cfg["final_sigmas_type"] == "zero"
            )
            second = cfg["solver_order"] == 2 and i >= start + 1 and not lower_final
            exp_neg_h = sigmas[i + 1] / sigmas[i]  # exp(-h) in the VE view: no special case for a final sigma of 0
            one_minus = 1.0 - exp_neg_h**2  # 1 - exp(-2h)
            coef[i, 0] = sigma_vp[i + 1] / sigma_vp[i] * exp_neg_h
            coef[i, 1] = alpha[i + 1] * one_minus
            coef[i, 3] = sigma_vp[i + 1] * np.sqrt(one_minus)
            if second:
                h = np.log(sigmas[i] / sigmas[i + 1])
                r0 = np.log(sigmas[i - 1] / sigmas[i]) / h
                if cfg["solver_type"] == "midpoint":
                    w1 = 0.5 * alpha[i + 1] * one_minus
                else:
                    w1 = alpha[i + 1] * (one_minus / (-2.0 * h) + 1.0)
                coef[i, 1] += w1 / r0
                coef[i, 2] = -w1 / r0
    check_finite(NAME, steps, pred=pred, coef=coef)
    return DPMSDETables(
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
    tables: DPMSDETables,
    i: torch.Tensor | int,
    x: torch.Tensor,
    model_output: torch.Tensor,
    history: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    """One SDE-DPM-Solver++ step; x, model_output, noise (B, C, H, W), history (1, B, C, H, W) updated in place."""
    p = at(tables.pred, i)  # (2,)
    c = at(tables.coef, i)  # (4,)
    m = p[0] * x + p[1] * model_output  # x0 prediction
    x_next = c[0] * x + c[1] * m + c[2] * history[0] + c[3] * noise
    history[0].copy_(m)
    return x_next
