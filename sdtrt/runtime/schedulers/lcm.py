"""LCM: multistep latent consistency sampling.

Luo, Tan, Huang, Li & Zhao 2023, "Latent Consistency Models", https://arxiv.org/abs/2310.04378, Algorithm 3 (with
the consistency-model boundary parametrisation of Song et al. 2023, https://arxiv.org/abs/2303.01469). With
``alpha_bar`` the training schedule and ``x0_hat`` the model's data prediction at timestep ``t``:

    c_skip(t) = sigma_data**2 / ((s t)**2 + sigma_data**2),   c_out(t) = s t / sqrt((s t)**2 + sigma_data**2)
    f(x_t)    = c_skip * x_t + c_out * x0_hat                  (sigma_data = 0.5, s = timestep_scaling)
    x_prev    = sqrt(alpha_bar_prev) * f(x_t) + sqrt(1 - alpha_bar_prev) * z,   z ~ N(0, I)

The timesteps are ``steps`` picks from the ``original_inference_steps`` (50) grid of the distillation; the last step
returns ``f(x_t)`` with no noise (its noise coefficient is 0 in the tables). The pipeline draws ``z`` every step:
diffusers draws none on the last step, which is the last draw anyway, so the sequence of used draws matches.
Parity reference: diffusers ``LCMScheduler``.
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

NAME = "lcm"
NEEDS_NOISE = True
SIGMA_DATA = 0.5

DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "original_inference_steps": 50,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "prediction_type": "epsilon",
    "thresholding": False,
    "timestep_spacing": "leading",
    "timestep_scaling": 10.0,
    "rescale_betas_zero_snr": False,
}


@dataclass(frozen=True)
class LCMTables(Tables):
    pred: torch.Tensor  # (E, 2) x0 = p0 x + p1 out
    coef: torch.Tensor  # (E, 4) f = c0 x0 + c1 x;  x_prev = c2 f + c3 noise
    clip_sample_range: float | None  # clamp x0 to +-range; None: no clipping


def make_tables(config: Mapping[str, Any], steps: int, start: int = 0) -> LCMTables:
    """Row ``i`` depends on nothing before it: img2img's ``start`` changes no row."""
    cfg = schedule.read_config(config, DEFAULTS, NAME)
    schedule.require_default(cfg, NAME, thresholding=False)
    schedule.check_steps(steps, cfg, NAME)
    original = int(cfg["original_inference_steps"])
    if not 1 <= original <= cfg["num_train_timesteps"]:
        raise UsageError(f"{NAME}: original_inference_steps={original} is out of range")
    if steps > original:
        raise UsageError(f"{NAME}: steps={steps} exceeds original_inference_steps={original} of the distillation")
    alpha_bar = schedule.alphas_cumprod(cfg, NAME)
    final_alpha_bar = 1.0 if cfg["set_alpha_to_one"] else alpha_bar[0]

    k = cfg["num_train_timesteps"] // original
    origin = (np.arange(1, original + 1) * k - 1)[::-1]  # the distillation's grid, descending
    t = origin[np.floor(np.linspace(0, original, num=steps, endpoint=False)).astype(np.int64)]  # (E,)
    t_prev = np.concatenate([t[1:], t[-1:]])
    a_t = alpha_bar[t]
    a_prev = np.where(t_prev >= 0, alpha_bar[np.maximum(t_prev, 0)], final_alpha_bar)

    scaled = t * float(cfg["timestep_scaling"])
    c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
    c_out = scaled / np.sqrt(scaled**2 + SIGMA_DATA**2)
    last = np.arange(len(t)) == len(t) - 1
    coef = np.stack(
        [c_out, c_skip, np.where(last, 1.0, np.sqrt(a_prev)), np.where(last, 0.0, np.sqrt(1.0 - a_prev))], axis=-1
    )
    pred = schedule.x0_eps_coefs(cfg["prediction_type"], np.sqrt(a_t), np.sqrt(1.0 - a_t))[:, :2]
    check_finite(NAME, steps, pred=pred, coef=coef)
    return LCMTables(
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
    tables: LCMTables,
    i: torch.Tensor | int,
    x: torch.Tensor,
    model_output: torch.Tensor,
    history: torch.Tensor | None,
    noise: torch.Tensor,
) -> torch.Tensor:
    """One LCM step; x, model_output, noise (B, C, H, W) -> (B, C, H, W). history is unused."""
    p = at(tables.pred, i)  # (2,)
    c = at(tables.coef, i)  # (4,)
    x0 = p[0] * x + p[1] * model_output
    if tables.clip_sample_range is not None:  # static: fixed by make_tables, not by tensor values
        x0 = x0.clamp(-tables.clip_sample_range, tables.clip_sample_range)
    denoised = c[0] * x0 + c[1] * x
    return c[2] * denoised + c[3] * noise
