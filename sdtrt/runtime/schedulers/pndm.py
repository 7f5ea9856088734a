"""PLMS: pseudo linear multistep (the PNDM paper's linear multistep part, ``skip_prk_steps=True`` as SD uses it).

Liu, Ren, Lin & Zhao 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds",
https://arxiv.org/abs/2202.09778. The transfer from ``t`` to ``t_prev`` (eq. 11, ``phi``) with
``alpha_bar`` the cumulative product of the training schedule:

    x_prev = sqrt(alpha_bar_prev / alpha_bar_t) * x_t
             - (alpha_bar_prev - alpha_bar_t) * e
               / (alpha_bar_t * sqrt(1 - alpha_bar_prev) + sqrt(alpha_bar_t * (1 - alpha_bar_t) * alpha_bar_prev))

where ``e`` is an Adams-Bashforth combination of the stored model outputs ``e_k``: ``(3, -1) / 2``,
``(23, -16, 5) / 12``, ``(55, -59, 37, -9) / 24``. Warm-up as diffusers does it: step 0 uses ``e_0`` alone from
``x_0``; the second evaluation re-runs the same transfer from the *saved* ``x_0`` with ``(e_0 + e_1) / 2`` (so the
UNet runs ``steps + 1`` times) and ``e_1`` is not stored. For v-prediction the combination is done on the raw
outputs and converted to ``eps`` with the step's base sample afterwards, exactly like diffusers.

History (4, *x.shape): slots 0-2 are a ring of stored outputs (the slot written at each evaluation is a table entry),
slot 3 the sample saved for the second evaluation. Parity reference: diffusers ``PNDMScheduler``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sdtrt.errors import UsageError

from . import schedule
from .tables import Tables, at, check_finite, combine, f64, i64, timesteps_f32, write_slot

NAME = "pndm"
NEEDS_NOISE = False
RING = 3  # previous outputs the 4th-order formula needs
SAVED = RING  # history slot of the saved sample

DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "skip_prk_steps": False,
    "set_alpha_to_one": False,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "steps_offset": 0,
}

# Adams-Bashforth weights by the number of outputs combined, newest first.
_AB = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


@dataclass(frozen=True)
class PNDMTables(Tables):
    coef: torch.Tensor  # (E, 3) x_prev = c0 x + c1 saved + c2 out + sum ring ...
    ring: torch.Tensor  # (E, RING) weight of each ring slot
    slot: torch.Tensor  # (E,) int64 ring slot that stores this evaluation's output


def _plms_timesteps(cfg: Mapping[str, Any], steps: int) -> np.ndarray:
    ts = schedule.timesteps_n(cfg, steps, NAME, rounded=True)[::-1]  # ascending, like diffusers' _timesteps
    return np.concatenate([ts[:-1], ts[-2:-1], ts[-1:]])[::-1].astype(np.int64)


def make_tables(config: Mapping[str, Any], steps: int, start: int = 0) -> PNDMTables:
    """PLMS tables; from evaluation ``start`` on (img2img), the warm-up restarts there as diffusers' counter does
    (rows before ``start`` are never run and stay zero)."""
    cfg = schedule.read_config(config, DEFAULTS, NAME)
    if not cfg["skip_prk_steps"]:
        raise UsageError(f"{NAME}: the Runge-Kutta warm-up (skip_prk_steps=False) is not supported; use PLMS")
    schedule.check_steps(steps, cfg, NAME)
    alpha_bar = schedule.alphas_cumprod(cfg, NAME)
    final_alpha_bar = 1.0 if cfg["set_alpha_to_one"] else alpha_bar[0]
    ratio = cfg["num_train_timesteps"] // steps
    v_pred = cfg["prediction_type"] == "v_prediction"

    ts = _plms_timesteps(cfg, steps)  # (E,) what the UNet sees, the 2nd entry repeated
    evals = len(ts)
    coef = np.zeros((evals, 3))
    ring = np.zeros((evals, RING))
    slot = np.zeros(evals, dtype=np.int64)
    for c in range(start, evals):
        r = c - start  # diffusers' counter: evaluations since the (re)start
        if r == 1:  # re-run the first transfer from the saved sample with the mean of e_0 and e_1
            t, t_prev, base = ts[c] + ratio, ts[c], 1
            weights, stored = (0.5, 0.5), (0,)
            slot[c] = 1 % RING  # e_1 is never read: park it where e_2 will go
        else:
            t, t_prev, base = ts[c], ts[c] - ratio, 0
            # Outputs kept: e_0, e_2, e_3, ...; the j-th kept one lives in ring slot j % RING.
            j = 0 if r == 0 else r - 1
            n_comb = min(max(r, 1), 4)
            weights, stored = _AB[n_comb], tuple(range(j - 1, j - n_comb, -1))
            slot[c] = j % RING
        a_t = alpha_bar[t]
        a_prev = alpha_bar[t_prev] if t_prev >= 0 else final_alpha_bar
        sample_coef = np.sqrt(a_prev / a_t)
        out_coef = -(a_prev - a_t) / (a_t * np.sqrt(1 - a_prev) + np.sqrt(a_t * (1 - a_t) * a_prev))
        if v_pred:  # eps = sqrt(a_t) * v_comb + sqrt(1 - a_t) * base
            sample_coef = sample_coef + out_coef * np.sqrt(1 - a_t)
            out_coef = out_coef * np.sqrt(a_t)
        coef[c, base] = sample_coef
        coef[c, 2] = out_coef * weights[0]
        for w, k in zip(weights[1:], stored, strict=True):
            ring[c, k % RING] += out_coef * w
    check_finite(NAME, steps, coef=coef, ring=ring)
    return PNDMTables(
        steps=steps,
        num_evals=evals,
        timesteps=timesteps_f32(ts),
        c_in=f64(np.ones(evals)),
        init_noise_sigma=1.0,
        history_len=RING + 1,
        needs_noise=NEEDS_NOISE,
        coef=f64(coef),
        ring=f64(ring),
        slot=i64(slot),
    )


def step(
    tables: PNDMTables,
    i: torch.Tensor | int,
    x: torch.Tensor,
    model_output: torch.Tensor,
    history: torch.Tensor,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One PLMS evaluation; x, model_output (B, C, H, W), history (4, B, C, H, W) updated in place."""
    c = at(tables.coef, i)  # (3,)
    x_prev = c[0] * x + c[1] * history[SAVED] + c[2] * model_output
    x_prev = combine(at(tables.ring, i), history[:RING], x_prev)
    write_slot(history, tables.slot, i, model_output)
    history[SAVED].copy_(x)
    return x_prev
