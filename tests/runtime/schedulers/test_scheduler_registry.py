"""The scheduler registry, the A1111 names, the table invariants and every UsageError the schedulers raise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdtrt.errors import UsageError
from sdtrt.runtime.schedulers import A1111_SAMPLERS, SCHEDULERS, get_scheduler, get_scheduler_a1111, lms, new_history

SD15 = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}


def test_registry_names() -> None:
    assert list(SCHEDULERS) == [
        "ddim",
        "pndm",
        "euler",
        "euler_a",
        "dpmpp_2m",
        "dpmpp_2m_karras",
        "lms",
        "unipc",
        "lcm",
        "euler_karras",
        "lms_karras",
        "heun",
        "heun_karras",
        "dpmpp_2m_exponential",
        "dpmpp_2m_sde",
        "dpmpp_2m_sde_karras",
        "dpmpp_2m_sde_exponential",
    ]
    noisy = {"euler_a", "lcm", "dpmpp_2m_sde", "dpmpp_2m_sde_karras", "dpmpp_2m_sde_exponential"}
    assert {name for name, s in SCHEDULERS.items() if s.needs_noise} == noisy
    assert get_scheduler("ddim:eta=0.5").needs_noise and not get_scheduler("ddim").needs_noise


def test_unknown_scheduler_lists_valid_names() -> None:
    with pytest.raises(UsageError, match=r"unknown scheduler 'dpm2'; choose one of: ddim, pndm, euler, .*, lcm, "):
        get_scheduler("dpm2")
    with pytest.raises(UsageError, match=r"scheduler 'ddim:eta=x': eta 'x' is not a number"):
        get_scheduler("ddim:eta=x")


def test_a1111_names() -> None:
    assert get_scheduler_a1111("DPM++ 2M Karras") is SCHEDULERS["dpmpp_2m_karras"]
    assert get_scheduler_a1111("Euler a") is SCHEDULERS["euler_a"]
    assert get_scheduler_a1111("PLMS") is SCHEDULERS["pndm"]
    assert set(A1111_SAMPLERS.values()) <= set(SCHEDULERS)
    with pytest.raises(UsageError, match=r"unknown sampler 'DPM2'; choose one of: 'DDIM', 'PLMS', .*'DPM\+\+ 2M SDE Karras'$"):
        get_scheduler_a1111("DPM2")


def test_karras_is_the_only_difference_between_the_dpmpp_names() -> None:
    plain = get_scheduler("dpmpp_2m").make_tables(SD15, 10)
    karras = get_scheduler("dpmpp_2m_karras").make_tables(SD15, 10)
    assert plain.timesteps.tolist() == [901, 811, 721, 631, 541, 451, 361, 271, 181, 91]
    assert karras.timesteps.tolist() == [999, 916, 815, 687, 523, 327, 146, 41, 7, 0]
    # A checkpoint config asking for another solver does not change what the name means.
    sde = {**SD15, "algorithm_type": "sde-dpmsolver++", "solver_order": 3, "use_karras_sigmas": True}
    torch.testing.assert_close(get_scheduler("dpmpp_2m").make_tables(sde, 10).coef, plain.coef)


@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("steps", (1, 2, 5, 50))
def test_table_shapes(name: str, steps: int) -> None:
    tables = get_scheduler(name).make_tables(SD15, steps)
    evals = steps + 1 if name == "pndm" and steps > 1 else steps  # PLMS re-evaluates its second step
    evals = 2 * steps - 1 if name.startswith("heun") else evals  # Heun: two evaluations a step but the last
    assert tables.steps == steps and tables.num_evals == evals
    assert tables.timesteps.shape == (evals,) and tables.timesteps.dtype == torch.float32
    assert tables.c_in.shape == (evals,)
    assert new_history(tables, torch.zeros(1, 4, 8, 8)).shape == (tables.history_len, 1, 4, 8, 8)
    for value in vars(tables).values():
        if isinstance(value, torch.Tensor):
            assert value.shape[0] == evals and torch.isfinite(value.double()).all()


def test_init_noise_sigma() -> None:
    assert get_scheduler("ddim").make_tables(SD15, 20).init_noise_sigma == 1.0
    # Euler family, leading spacing: sqrt(sigma_max**2 + 1); linspace/trailing: sigma_max.
    assert get_scheduler("euler").make_tables(SD15, 20).init_noise_sigma == pytest.approx(11.0736, abs=1e-4)
    trailing = {**SD15, "timestep_spacing": "trailing"}
    assert get_scheduler("euler").make_tables(trailing, 20).init_noise_sigma == pytest.approx(14.6146, abs=1e-4)


def test_lms_coefficients_are_exact_integrals() -> None:
    """Our polynomial antiderivatives against an independent Gauss-Legendre rule (exact to degree 19)."""
    sigmas = np.array([14.6, 9.7, 6.1, 3.3, 1.4, 0.5, 0.0])
    nodes, weights = np.polynomial.legendre.leggauss(10)
    for i in range(len(sigmas) - 1):
        order = min(i + 1, 4)
        a, b = sigmas[i], sigmas[i + 1]
        s = 0.5 * (b - a) * nodes + 0.5 * (a + b)
        for k, coeff in enumerate(lms.lms_coefficients(sigmas, i, order)):
            basis = np.ones_like(s)
            for m in range(order):
                if m != k:
                    basis *= (s - sigmas[i - m]) / (sigmas[i - k] - sigmas[i - m])
            assert coeff == pytest.approx(0.5 * (b - a) * np.sum(weights * basis), rel=1e-12, abs=1e-14)
    # The weights of an order-K rule integrate constants exactly: they sum to the step length.
    assert lms.lms_coefficients(sigmas, 4, 4).sum() == pytest.approx(sigmas[5] - sigmas[4], rel=1e-12)


@pytest.mark.parametrize(
    ("name", "config", "steps", "message"),
    [
        ("ddim", SD15, 0, r"ddim: steps must be a positive integer, got 0"),
        ("ddim", SD15, 1001, r"ddim: steps=1001 exceeds the 1000 training timesteps"),
        ("euler", SD15, 2.5, r"euler: steps must be a positive integer, got 2.5"),
        ("ddim", {**SD15, "prediction_type": "sample"}, 10, r"ddim: prediction_type 'sample' is not supported"),
        ("ddim", {**SD15, "thresholding": True}, 10, r"ddim: thresholding=True is not supported"),
        ("ddim", {**SD15, "beta_schedule": "sigmoid"}, 10, r"ddim: beta_schedule 'sigmoid' is not supported"),
        ("ddim", {**SD15, "timestep_spacing": "karras"}, 10, r"ddim: timestep_spacing 'karras' is not supported"),
        ("ddim", {**SD15, "trained_betas": [0.1] * 10}, 10, r"ddim: trained_betas has 10 values, expected 1000"),
        (
            "ddim",
            {**SD15, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"},
            10,
            r"ddim: this scheduler config gives non-finite pred coefficients at steps=10",
        ),
        ("euler", {**SD15, "use_exponential_sigmas": True}, 10, r"euler: use_exponential_sigmas=True is not"),
        ("euler", {**SD15, "timestep_type": "continuous"}, 10, r"euler: timestep_type='continuous' is not"),
        ("euler", {**SD15, "final_sigmas_type": "last"}, 10, r"euler: final_sigmas_type 'last' is not supported"),
        ("lms", {**SD15, "use_beta_sigmas": True}, 10, r"lms: use_beta_sigmas=True is not supported"),
        ("dpmpp_2m", {**SD15, "thresholding": True}, 10, r"dpmpp_2m: thresholding=True is not supported"),
        ("dpmpp_2m", {**SD15, "use_lu_lambdas": True}, 10, r"dpmpp_2m: use_lu_lambdas=True is not supported"),
        ("unipc", {**SD15, "predict_x0": False}, 10, r"unipc: predict_x0=False is not supported"),
        ("unipc", {**SD15, "solver_order": 4}, 10, r"unipc: solver_order=4 is not supported \(1, 2 or 3\)"),
        ("unipc", {**SD15, "solver_type": "bh3"}, 10, r"unipc: solver_type 'bh3' is not supported"),
        ("unipc", {**SD15, "solver_p": "ddim"}, 10, r"unipc: solver_p='ddim' is not supported"),
        ("heun", {**SD15, "clip_sample": True}, 10, r"heun: clip_sample=True is not supported"),
        ("dpmpp_2m_sde", {**SD15, "solver_type": "x"}, 10, r"dpmpp_2m_sde: solver_type 'x' is not supported"),
        ("lcm", SD15, 51, r"lcm: steps=51 exceeds original_inference_steps=50 of the distillation"),
        ("lcm", {**SD15, "original_inference_steps": 0}, 1, r"lcm: original_inference_steps=0 is out of range"),
    ],
)
def test_usage_errors(name: str, config: dict, steps: int, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        get_scheduler(name).make_tables(config, steps)


def test_ddim_eta_comes_from_the_name_only() -> None:
    from sdtrt.runtime.schedulers import ddim

    with pytest.raises(UsageError, match=r"ddim: eta must be a number between 0 and 1, got 2"):
        ddim.make_tables({**SD15, "eta": 2}, 10)
    # a config key "eta" (no diffusers config has one) does not make plain "ddim" stochastic
    assert not get_scheduler("ddim").make_tables({**SD15, "eta": 0.5}, 10).needs_noise
    assert get_scheduler("ddim:eta=0.5").make_tables(SD15, 10).needs_noise


def test_pndm_runge_kutta_warmup_is_not_supported() -> None:
    from sdtrt.runtime.schedulers import pndm

    with pytest.raises(UsageError, match=r"pndm: the Runge-Kutta warm-up \(skip_prk_steps=False\) is not supported"):
        pndm.make_tables({**SD15, "skip_prk_steps": False}, 10)
    # The registry name always means PLMS, whatever the checkpoint's config says.
    assert get_scheduler("pndm").make_tables({**SD15, "skip_prk_steps": False}, 10).num_evals == 11


def test_dpmpp_solver_order_3_is_not_supported() -> None:
    from sdtrt.runtime.schedulers import dpmpp_2m

    with pytest.raises(UsageError, match=r"dpmpp_2m: solver_order=3 is not supported \(1 or 2\)"):
        dpmpp_2m.make_tables({**SD15, "solver_order": 3}, 10)
    with pytest.raises(UsageError, match=r"dpmpp_2m: algorithm_type='sde-dpmsolver\+\+' is not supported"):
        dpmpp_2m.make_tables({**SD15, "algorithm_type": "sde-dpmsolver++"}, 10)
