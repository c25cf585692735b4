import functools

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from webui.engine import samplers
from webui.errors import UserError

# diffusers feeds torch tensors to numpy; NumPy 2 warns thousands of times per run.
pytestmark = pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")

SD15 = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
}
STOCHASTIC = {"Euler a", "DPM++ SDE", "DPM++ 2M SDE", "DPM2 a"}
A1111_SAMPLERS = ["DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "Euler a", "Euler", "LMS", "Heun", "DPM2", "DPM2 a", "DDIM", "UniPC"]


def denoise(sampler_name: str, noise_seed: int, schedule_type: str = "Automatic", config: dict = SD15, steps: int = 8):
    """A tiny sampling loop around a fake model that predicts eps = 0.1 * latents.

    The starting latents are always the same; ``noise_seed`` feeds only the sampler's own noise.
    """
    scheduler = samplers.make_scheduler(sampler_name, schedule_type, config, seed=noise_seed)
    scheduler.set_timesteps(steps)
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0)) * scheduler.init_noise_sigma
    generator = torch.Generator().manual_seed(noise_seed)
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(latents, t)
        latents = scheduler.step(0.1 * model_input, t, latents, **samplers.step_kwargs(scheduler, generator)).prev_sample
    return latents


@pytest.mark.parametrize("name", A1111_SAMPLERS)
def test_every_sampler_denoises_reproducibly(name):
    first = denoise(name, noise_seed=1)
    assert torch.isfinite(first).all()
    assert first.abs().max() < 1000
    assert torch.equal(first, denoise(name, noise_seed=1))
    assert torch.equal(first, denoise(name, noise_seed=2)) == (name not in STOCHASTIC)


@pytest.mark.parametrize("schedule_type", ["Uniform", "Karras", "Exponential", "SGM Uniform"])
def test_schedule_types_run_with_v_prediction(schedule_type):
    assert torch.isfinite(denoise("DPM++ 2M", 3, schedule_type, {**SD15, "prediction_type": "v_prediction"})).all()


def test_names_are_a1111s():
    assert samplers.sampler_names() == A1111_SAMPLERS
    assert samplers.schedule_type_names() == ["Automatic", "Uniform", "Karras", "Exponential", "SGM Uniform"]


@pytest.mark.parametrize(
    "asked, expected",
    [
        (("euler A", "automatic"), ("Euler a", "Automatic")),
        (("k_euler_a", "karras"), ("Euler a", "Karras")),
        (("euler_a", "sgm_uniform"), ("Euler a", "SGM Uniform")),
        (("K_DPMPP_2M", "SGMUniform"), ("DPM++ 2M", "SGM Uniform")),
        (("dpm++ 2m", ""), ("DPM++ 2M", "Automatic")),
        (("DPM++ 2M Karras", "Automatic"), ("DPM++ 2M", "Karras")),
        (("DPM++ 2M SDE Exponential", None), ("DPM++ 2M SDE", "Exponential")),
    ],
)
def test_lookup_accepts_a1111_spellings(asked, expected):
    assert samplers.resolve(*asked) == expected


def test_dpmpp_2m_config():
    scheduler = samplers.make_scheduler("DPM++ 2M", "Automatic", SD15)
    assert isinstance(scheduler, DPMSolverMultistepScheduler)
    assert scheduler.config.algorithm_type == "dpmsolver++"
    assert scheduler.config.solver_order == 2
    assert scheduler.config.use_karras_sigmas  # A1111's default for DPM++ 2M
    assert scheduler.config.beta_schedule == "scaled_linear"
    sde = samplers.make_scheduler("DPM++ 2M SDE", "Automatic", SD15)
    assert sde.config.algorithm_type == "sde-dpmsolver++" and sde.config.use_exponential_sigmas


@pytest.mark.parametrize(
    "schedule_type, expected",
    [
        ("Automatic", {"timestep_spacing": "linspace", "use_karras_sigmas": False}),
        ("Karras", {"timestep_spacing": "linspace", "use_karras_sigmas": True}),
        ("Exponential", {"use_exponential_sigmas": True}),
        ("SGM Uniform", {"timestep_spacing": "trailing", "use_karras_sigmas": False}),
    ],
)
def test_schedule_type_config(schedule_type, expected):
    config = samplers.make_scheduler("Euler", schedule_type, SD15).config
    assert {k: config[k] for k in expected} == expected


def test_ddim_ignores_schedule_type_like_a1111():
    scheduler = samplers.make_scheduler("DDIM", "Karras", {**SD15, "timestep_spacing": "trailing", "clip_sample": True})
    assert isinstance(scheduler, DDIMScheduler)
    config = scheduler.config
    assert (config.timestep_spacing, config.steps_offset, config.clip_sample, config.set_alpha_to_one) == ("leading", 1, False, False)
    scheduler.set_timesteps(20)
    assert scheduler.timesteps[0] == 951 and scheduler.timesteps[-1] == 1  # A1111: range(0, 1000, 50) + 1


def test_unsupported_schedule_type_names_the_field():
    with pytest.raises(UserError) as err:
        samplers.make_scheduler("Euler a", "Karras", SD15)
    assert err.value.field == "scheduler"
    assert "Uniform" in err.value.message and "SGM Uniform" in err.value.message


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(UserError) as err:
        samplers.make_scheduler("Eulerish", "Automatic", SD15)
    assert err.value.field == "sampler_name" and "DPM++ 2M" in err.value.message
    with pytest.raises(UserError) as err:
        samplers.make_scheduler("Euler", "Fancy", SD15)
    assert err.value.field == "scheduler" and "Karras" in err.value.message


def test_zero_snr_model_needs_a_scheduler_that_supports_it():
    zsnr = {**SD15, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True}
    assert samplers.make_scheduler("Euler", "SGM Uniform", zsnr).config.rescale_betas_zero_snr
    with pytest.raises(UserError) as err:
        samplers.make_scheduler("Heun", "Automatic", zsnr)
    assert err.value.field == "sampler_name"


def test_register_sampler_for_extensions(monkeypatch):
    monkeypatch.setattr(samplers, "_samplers", dict(samplers._samplers))
    factory = functools.partial(EulerDiscreteScheduler, interpolation_type="log_linear")
    samplers.register_sampler("Euler LL", factory, aliases=["k_euler_ll"], default_schedule="Karras")
    assert samplers.sampler_names()[-1] == "Euler LL"
    scheduler = samplers.make_scheduler("k_euler_ll", "Automatic", SD15)
    assert scheduler.config.interpolation_type == "log_linear" and scheduler.config.use_karras_sigmas
    assert samplers.api_samplers()[-1] == {"name": "Euler LL", "aliases": ["k_euler_ll"], "options": {"scheduler": "karras"}}


def test_api_shapes():
    listed = samplers.api_samplers()
    assert listed[0] == {"name": "DPM++ 2M", "aliases": ["k_dpmpp_2m"], "options": {"scheduler": "karras"}}
    assert {"name": "Euler", "aliases": ["k_euler"], "options": {}} in listed
    schedulers = samplers.api_schedulers()
    assert schedulers[0] == {"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1, "need_inner_model": False}
    karras = next(s for s in schedulers if s["name"] == "karras")
    assert karras["label"] == "Karras" and karras["default_rho"] == 7.0
