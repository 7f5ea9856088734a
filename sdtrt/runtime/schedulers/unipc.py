"""UniPC: unified predictor-corrector multistep solver (B(h) variants, data prediction).

Zhao, Bai, Rao, Zhou & Lu 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion
Models", https://arxiv.org/abs/2302.04867, Algorithms 2-3 (UniP-p / UniC-p, ``predict_x0``). VP ``alpha_t``,
``sigma_t``, ``lambda = log(alpha_t / sigma_t)``; ``m_i`` the x0 prediction at step ``i``, ``h = lambda_t - lambda_s0``,
``r_k = (lambda_{s_k} - lambda_s0) / h``, ``D1_k = (m_{s_k} - m_s0) / r_k``, ``B(h) = exp(-h) - 1`` (bh2) or ``-h``:

    UniP:  x_t  = (sigma_t / sigma_s0) x_s0 - alpha_t (exp(-h) - 1) m_s0 - alpha_t B(h) sum_k rho^p_k D1_k
    UniC:  x^c_t = (sigma_t / sigma_s0) x^c_s0 - alpha_t (exp(-h) - 1) m_s0
                   - alpha_t B(h) (sum_k rho^c_k D1_k + rho^c_K (m_t - m_s0))

``rho`` solves the small order-conditions system ``R rho = b`` (host side, float64). The corrector of step ``i``
refines the previous predictor's output ``x_i`` using the model output *at* ``x_i`` itself, so it costs no extra
UNet call: step ``i`` computes ``m_i``, then ``x^c_i`` (from ``x^c_{i-1}``, ``m_{i-1}``, ``m_{i-2}``, ``m_i``), then
predicts ``x_{i+1}`` from ``x^c_i``. The final sample is the last predictor output (no corrector after it). Order
warm-up (``min(i + 1, order)``), ``lower_order_final`` and ``disable_corrector`` are rows of the tables.

History (order + 1, *x.shape): a ring of the last ``order`` x0 predictions, then ``x^c_{i-1}``.
Parity reference: diffusers ``UniPCMultistepScheduler`` (``predict_x0=True``, ``solver_p=None``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sdtrt.errors import UsageError

from . import schedule
from .dpmpp_2m import multistep_grid
from .tables import Tables, at, check_finite, combine, f64, i64, timesteps_f32, write_slot

NAME = "unipc"
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
    "predict_x0": True,
    "solver_type": "bh2",
    "lower_order_final": True,
    "disable_corrector": [],
    "solver_p": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_flow_sigmas": False,
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "final_sigmas_type": "zero",
    "rescale_betas_zero_snr": False,
    "use_dynamic_shifting": False,
    "sigma_min": None,
    "sigma_max": None,
}


@dataclass(frozen=True)
class UniPCTables(Tables):
    pred: torch.Tensor  # (E, 2) m = p0 x + p1 out (x0 prediction)
    corr: torch.Tensor  # (E, 3) x^c = c0 x + c1 x^c_prev + c2 m + sum corr_ring ...
    corr_ring: torch.Tensor  # (E, K) weight of each ring slot in the corrector
    coef: torch.Tensor  # (E, 2) x_next = c0 x^c + c1 m + sum ring ...
    ring: torch.Tensor  # (E, K) weight of each ring slot in the predictor
    slot: torch.Tensor  # (E,) int64 ring slot that stores this step's m


def _rhos(h: float, rks: Sequence[float], order: int, bh2: bool, corrector: bool) -> tuple[np.ndarray, float, float]:
    """``(rho, h phi_1(h), B(h))`` of UniP (``corrector=False``) or UniC of the given order, as in the paper (eq. 8)."""
    hh = -h  # data prediction integrates in -lambda
    h_phi_1 = np.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    b_h = np.expm1(hh) if bh2 else hh
    rks_all = np.array([*rks, 1.0])
    rows, b = [], []
    factorial = 1
    for k in range(1, order + 1):
        rows.append(rks_all ** (k - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    r_mat, b_vec = np.stack(rows), np.array(b)
    if corrector:
        rho = np.array([0.5]) if order == 1 else np.linalg.solve(r_mat, b_vec)
    elif order == 1:
        rho = np.zeros(0)
    elif order == 2:
        rho = np.array([0.5])
    else:
        rho = np.linalg.solve(r_mat[:-1, :-1], b_vec[:-1])
    return rho, h_phi_1, b_h


def make_tables(config: Mapping[str, Any], steps: int, start: int = 0) -> UniPCTables:
    """UniPC tables; from evaluation ``start`` on (img2img) the order warm-up restarts and the first step there has
    no corrector, as diffusers' ``lower_order_nums`` and ``last_sample`` after ``set_timesteps``."""
    cfg = schedule.read_config(config, DEFAULTS, NAME)
    if cfg["solver_type"] in ("midpoint", "heun", "logrho"):  # diffusers maps these to bh2
        cfg["solver_type"] = "bh2"
    schedule.require_default(
        cfg,
        NAME,
        thresholding=False,
        predict_x0=True,
        solver_p=None,
        use_exponential_sigmas=False,
        use_beta_sigmas=False,
        use_flow_sigmas=False,
        use_dynamic_shifting=False,
    )
    order = cfg["solver_order"]
    if order not in (1, 2, 3):
        raise UsageError(f"{NAME}: solver_order={order} is not supported (1, 2 or 3)")
    if cfg["solver_type"] not in ("bh1", "bh2"):
        raise UsageError(f"{NAME}: solver_type {cfg['solver_type']!r} is not supported; use bh1 or bh2")
    bh2 = cfg["solver_type"] == "bh2"
    disabled = set(cfg["disable_corrector"] or ())

    timesteps, sigmas = multistep_grid(cfg, steps, NAME, unipc=True)
    evals = len(timesteps)
    alpha, sigma_vp = schedule.vp_from_ve(sigmas)  # (E + 1,)
    pred = schedule.x0_eps_coefs(cfg["prediction_type"], alpha[:-1], sigma_vp[:-1])[:, :2]
    this_order = [min(order, evals - i if cfg["lower_order_final"] else order, min(max(i - start, 0), order) + 1)
                  for i in range(evals)]

    corr = np.zeros((evals, 3))
    corr_ring = np.zeros((evals, order))
    coef = np.zeros((evals, 2))
    ring = np.zeros((evals, order))

    def lam_diff(a: int, b: int) -> float:
        """``lambda_a - lambda_b`` as a log of VE sigmas (``inf`` towards a final sigma of 0)."""
        return np.log(sigmas[b] / sigmas[a])

    with np.errstate(divide="ignore", invalid="ignore"):
        for i in range(evals):
            # UniC: refine x_i (the previous predictor's output) into x^c_i, using m_i.
            if i <= start or (i - 1) in disabled:
                corr[i, 0] = 1.0
            else:
                k = this_order[i - 1]
                h = lam_diff(i, i - 1)
                rks = [lam_diff(i - 1 - j, i - 1) / h for j in range(1, k)]
                rho, h_phi_1, b_h = _rhos(h, rks, k, bh2, corrector=True)
                a = alpha[i]
                corr[i, 1] = sigma_vp[i] / sigma_vp[i - 1]
                corr[i, 2] = -a * b_h * rho[-1]  # rho_K (m_i - m_{i-1})
                corr_ring[i, (i - 1) % order] = -a * h_phi_1 + a * b_h * rho[-1]
                for j, rk in enumerate(rks, start=1):  # rho_j D1_j, D1_j = (m_{i-1-j} - m_{i-1}) / r_j
                    w = a * b_h * rho[j - 1] / rk
                    corr_ring[i, (i - 1) % order] += w
                    corr_ring[i, (i - 1 - j) % order] -= w
            # UniP: predict x_{i+1} from x^c_i.
            k = this_order[i]
            h = lam_diff(i + 1, i)
            rks = [lam_diff(i - j, i) / h for j in range(1, k)]
            rho, h_phi_1, b_h = _rhos(h, rks, k, bh2, corrector=False)
            a = alpha[i + 1]
            coef[i, 0] = sigma_vp[i + 1] / sigma_vp[i]
            coef[i, 1] = -a * h_phi_1
            for j, rk in enumerate(rks, start=1):  # rho_j D1_j, D1_j = (m_{i-j} - m_i) / r_j
                w = a * b_h * rho[j - 1] / rk
                coef[i, 1] += w
                ring[i, (i - j) % order] -= w
    check_finite(NAME, steps, pred=pred, corr=corr, corr_ring=corr_ring, coef=coef, ring=ring)
    return UniPCTables(
        steps=steps,
        num_evals=evals,
        timesteps=timesteps_f32(timesteps),
        c_in=f64(np.ones(evals)),
        init_noise_sigma=1.0,
        history_len=order + 1,
        needs_noise=NEEDS_NOISE,
        pred=f64(pred),
        corr=f64(corr),
        corr_ring=f64(corr_ring),
        coef=f64(coef),
        ring=f64(ring),
        slot=i64(np.arange(evals) % order),
    )


def step(
    tables: UniPCTables,
    i: torch.Tensor | int,
    x: torch.Tensor,
    model_output: torch.Tensor,
    history: torch.Tensor,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One UniPC step (corrector for x, then predictor); x, model_output (B, C, H, W),
    history (order + 1, B, C, H, W) updated in place."""
    order = history.shape[0] - 1
    p = at(tables.pred, i)  # (2,)
    m = p[0] * x + p[1] * model_output  # x0 prediction at x_i
    ms = history[:order]  # (order, B, C, H, W) ring of previous m
    c = at(tables.corr, i)  # (3,)
    x_corr = combine(at(tables.corr_ring, i), ms, c[0] * x + c[1] * history[order] + c[2] * m)
    k = at(tables.coef, i)  # (2,)
    x_next = combine(at(tables.ring, i), ms, k[0] * x_corr + k[1] * m)
    history[order].copy_(x_corr)
    write_slot(history, tables.slot, i, m)
    return x_next
