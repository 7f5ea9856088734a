"""LMS: the linear multistep (Adams-Bashforth in sigma) sampler of k-diffusion, order 4.

Karras et al. 2022, https://arxiv.org/abs/2206.00364 (the VE ODE ``dx/dsigma = d``), integrated with a linear
multistep method over the non-uniform sigma ladder (Crowson's k-diffusion ``sample_lms``). With VE state
``x = x_t / alpha_t`` and ``d_j = (x_j - x0_hat_j) / sigma_j``:

    x_{i+1} = x_i + sum_{k < K} c_{i,k} d_{i-k},   c_{i,k} = integral_{sigma_i}^{sigma_{i+1}} l_{i,k}(s) ds
    l_{i,k}(s) = prod_{m < K, m != k} (s - sigma_{i-m}) / (sigma_{i-k} - sigma_{i-m}),   K = min(i + 1, 4)

The Lagrange basis ``l`` is a polynomial, so ``c`` is integrated exactly here (diffusers uses scipy's adaptive
quadrature, which is exact for these cubics to rounding). The order ramp ``K = 1, 2, 3, 4`` is part of the tables.
History (3, *x.shape): a ring of the last three ``d``. Parity reference: diffusers ``LMSDiscreteScheduler``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.polynomial import polynomial as P

from . import schedule
from .euler import derivative_coefs, sigma_grid
from .tables import Tables, at, check_finite, combine, f64, i64, timesteps_f32, write_slot

NAME = "lms"
NEEDS_NOISE = False
ORDER = 4
RING = ORDER - 1

DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "prediction_type": "epsilon",
    "timestep_spacing": "linspace",
    "steps_offset": 0,
}


@dataclass(frozen=True)
class LMSTables(Tables):
    deriv: torch.Tensor  # (E, 2) d = d0 x + d1 out, stored for the next steps
    coef: torch.Tensor  # (E, 2) x_next = c0 x + c1 out + sum ring ...  (this step's d folded in)
    ring: torch.Tensor  # (E, RING) weight of each ring slot (older d's)
    slot: torch.Tensor  # (E,) int64 ring slot that stores this step's d


def lms_coefficients(sigmas: np.ndarray, i: int, order: int) -> np.ndarray:
    """``c_{i,k}`` for ``k < order``: exact integrals of the Lagrange basis on nodes ``sigmas[i - k]``.

    Integrated in ``u = s - sigma_i`` so the monomial coefficients stay small.
    """
    nodes = sigmas[i - np.arange(order)] - sigmas[i]  # (order,) shifted nodes, nodes[0] == 0
    upper = sigmas[i + 1] - sigmas[i]
    coeffs = np.empty(order)
    for k in range(order):
        others = np.delete(nodes, k)
        basis = P.polyfromroots(others) / np.prod(nodes[k] - others)
        antiderivative = P.polyint(basis)
        coeffs[k] = P.polyval(upper, antiderivative)  # the antiderivative is 0 at u = 0
    return coeffs


def make_tables(config: Mapping[str, Any], steps: int, start: int = 0) -> LMSTables:
    """LMS tables. From evaluation ``start`` on (img2img) only the derivatives stored since ``start`` are combined,
    as diffusers does: its coefficients keep the order ``min(i + 1, 4)`` of the absolute step ``i`` while its list
    of derivatives restarts empty, and ``zip`` drops the terms it lacks."""
    cfg = schedule.read_config(config, DEFAULTS, NAME)
    schedule.require_default(cfg, NAME, use_exponential_sigmas=False, use_beta_sigmas=False)
    grid = sigma_grid(cfg, steps, NAME, karras=bool(cfg["use_karras_sigmas"]), final="zero")
    sigma = grid.sigmas[:-1]
    evals = len(sigma)
    cur = np.zeros(evals)
    ring = np.zeros((evals, RING))
    for i in range(evals):
        c = lms_coefficients(grid.sigmas, i, min(i + 1, ORDER))
        cur[i] = c[0]
        for k in range(1, min(len(c), i - start + 1)):
            ring[i, (i - k) % RING] = c[k]
    deriv = derivative_coefs(cfg["prediction_type"], sigma)
    # x + c_0 d folded into one pair of coefficients: on the first step x and c_0 d cancel to ~1% of x
    # (sigma 14.6 -> 0.03), and summing them in float32 would cost ~1e-5 of the result.
    coef = np.stack([1 + cur * deriv[:, 0], cur * deriv[:, 1]], axis=-1)
    check_finite(NAME, steps, deriv=deriv, coef=coef, ring=ring)
    return LMSTables(
        steps=steps,
        num_evals=evals,
        timesteps=timesteps_f32(grid.timesteps),
        c_in=f64(1 / np.sqrt(sigma**2 + 1)),
        init_noise_sigma=grid.init_noise_sigma,
        history_len=RING,
        needs_noise=NEEDS_NOISE,
        deriv=f64(deriv),
        coef=f64(coef),
        ring=f64(ring),
        slot=i64(np.arange(evals) % RING),
    )


def step(
    tables: LMSTables,
    i: torch.Tensor | int,
    x: torch.Tensor,
    model_output: torch.Tensor,
    history: torch.Tensor,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One LMS step; x, model_output (B, C, H, W), history (3, B, C, H, W) updated in place."""
    c = at(tables.coef, i)  # (2,)
    x_next = combine(at(tables.ring, i), history, c[0] * x + c[1] * model_output)
    dc = at(tables.deriv, i)  # (2,)
    write_slot(history, tables.slot, i, dc[0] * x + dc[1] * model_output)
    return x_next
