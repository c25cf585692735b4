import functools

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, PNDMScheduler

from webui.engine.sampling import samplers
from webui.errors import UserError

REGISTRY = samplers.SamplerRegistry()

# diffusers feeds torch tensors to numpy; NumPy 2 warns thousands of times per run.
pytestmark = pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")

SD15 = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
}
STOCHASTIC = {"Euler a", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM2 a"}
A1111_SAMPLERS = ["DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 2S a", "Euler a", "Euler", "LMS",
                  "Heun", "DPM2", "DPM2 a", "DPM fast", "DPM adaptive", "Restart", "DDIM", "DDIM CFG++", "PLMS", "UniPC",
                  "LCM", "TCD"]  # (TCD: reForge's and ComfyUI's, not A1111's)
A1111_SCHEDULE_TYPES = ["Automatic", "Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform", "KL Optimal",
                        "Align Your Steps", "Simple", "Normal", "DDIM", "Beta"]
WITH_DIFFUSERS_SCHEDULER = ["DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "Euler a", "Euler", "LMS",
                            "Heun", "DPM2", "DPM2 a", "DDIM", "PLMS", "UniPC"]


def denoise(sampler_name: str, noise_seed: int, schedule_type: str = "Automatic", config: dict = SD15, steps: int = 8):
    """A tiny sampling loop around a fake model that predicts eps = 0.1 * latents.

    The starting latents are always the same; ``noise_seed`` feeds only the sampler's own noise.
    """
    scheduler = REGISTRY.make_scheduler(sampler_name, schedule_type, config, seed=noise_seed)
    scheduler.set_timesteps(steps)
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0)) * scheduler.init_noise_sigma
    generator = torch.Generator().manual_seed(noise_seed)
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(latents, t)
        latents = scheduler.step(0.1 * model_input, t, latents, **samplers.step_kwargs(scheduler, generator)).prev_sample
    return latents


@pytest.mark.parametrize("name", WITH_DIFFUSERS_SCHEDULER)
def test_every_diffusers_scheduler_denoises_reproducibly(name):
    first = denoise(name, noise_seed=1)
    assert torch.isfinite(first).all()
    assert first.abs().max() < 1000
    assert torch.equal(first, denoise(name, noise_seed=1))
    assert torch.equal(first, denoise(name, noise_seed=2)) == (name not in STOCHASTIC)


@pytest.mark.parametrize("schedule_type", ["Uniform", "Karras", "Exponential", "SGM Uniform"])
def test_schedule_types_run_with_v_prediction(schedule_type):
    assert torch.isfinite(denoise("DPM++ 2M", 3, schedule_type, {**SD15, "prediction_type": "v_prediction"})).all()


def test_names_are_a1111s():
    assert REGISTRY.sampler_names() == A1111_SAMPLERS
    assert REGISTRY.schedule_type_names() == A1111_SCHEDULE_TYPES
    assert [name for name in A1111_SAMPLERS if REGISTRY.find_sampler(name)[0].factory] == WITH_DIFFUSERS_SCHEDULER


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
        (("DPM++ 2S a Karras", "Automatic"), ("DPM++ 2S a", "Karras")),
        (("DPM++ 2M SDE Heun Karras", "Automatic"), ("DPM++ 2M SDE Heun", "Karras")),
        (("k_dpmpp_2s_a", "kl_optimal"), ("DPM++ 2S a", "KL Optimal")),
        (("k_dpm_fast", "align_your_steps"), ("DPM fast", "Align Your Steps")),
        (("k_dpm_ad", "polyexponential"), ("DPM adaptive", "Polyexponential")),
        (("k_dpmpp_2m_sde_heun", "simple"), ("DPM++ 2M SDE Heun", "Simple")),
        (("restart", "normal"), ("Restart", "Normal")),
        (("ddim_cfgpp", "ddim"), ("DDIM CFG++", "DDIM")),
        (("plms", "beta"), ("PLMS", "Beta")),
        (("lcm", None), ("LCM", "Automatic")),
        (("Euler Align Your Steps", None), ("Euler", "Align Your Steps")),
    ],
)
def test_lookup_accepts_a1111_spellings(asked, expected):
    assert REGISTRY.resolve(*asked) == expected


def test_dpmpp_2m_config():
    scheduler = REGISTRY.make_scheduler("DPM++ 2M", "Automatic", SD15)
    assert isinstance(scheduler, DPMSolverMultistepScheduler)
    assert scheduler.config.algorithm_type == "dpmsolver++"
    assert scheduler.config.solver_order == 2
    assert scheduler.config.use_karras_sigmas  # A1111's default for DPM++ 2M
    assert scheduler.config.beta_schedule == "scaled_linear"
    sde = REGISTRY.make_scheduler("DPM++ 2M SDE", "Automatic", SD15)
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
    config = REGISTRY.make_scheduler("Euler", schedule_type, SD15).config
    assert {k: config[k] for k in expected} == expected


def test_ddim_ignores_schedule_type_like_a1111():
    scheduler = REGISTRY.make_scheduler("DDIM", "Karras", {**SD15, "timestep_spacing": "trailing", "clip_sample": True})
    assert isinstance(scheduler, DDIMScheduler)
    config = scheduler.config
    assert (config.timestep_spacing, config.steps_offset, config.clip_sample, config.set_alpha_to_one) == ("leading", 1, False, False)
    scheduler.set_timesteps(20)
    assert scheduler.timesteps[0] == 951 and scheduler.timesteps[-1] == 1  # A1111: range(0, 1000, 50) + 1


def test_plms_is_pndm_on_a1111s_ddim_timesteps():
    scheduler = REGISTRY.make_scheduler("PLMS", "Karras", SD15)
    assert isinstance(scheduler, PNDMScheduler) and scheduler.config.skip_prk_steps
    scheduler.set_timesteps(10)
    # The first step is taken twice (the second order start of the original PLMS), then one per timestep.
    assert scheduler.timesteps.tolist() == [901, 801, 801, 701, 601, 501, 401, 301, 201, 101, 1]


def test_dpmpp_2m_sde_heun_config():
    config = REGISTRY.make_scheduler("DPM++ 2M SDE Heun", "Automatic", SD15).config
    assert (config.algorithm_type, config.solver_type, config.use_exponential_sigmas) == ("sde-dpmsolver++", "heun", True)


def test_diffusers_scheduler_without_the_schedule_type_names_the_field():
    """make_scheduler is the diffusers scheduler alone; the engine runs such pairs in sigma space (test_sampling)."""
    with pytest.raises(UserError) as err:
        REGISTRY.make_scheduler("Euler a", "Karras", SD15)
    assert err.value.field == "scheduler"
    assert "Uniform" in err.value.message and "SGM Uniform" in err.value.message


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(UserError) as err:
        REGISTRY.make_scheduler("Eulerish", "Automatic", SD15)
    assert err.value.field == "sampler_name" and "DPM++ 2M" in err.value.message
    with pytest.raises(UserError) as err:
        REGISTRY.make_scheduler("Euler", "Fancy", SD15)
    assert err.value.field == "scheduler" and "Karras" in err.value.message


def test_zero_snr_model_needs_a_scheduler_that_supports_it():
    zsnr = {**SD15, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True}
    assert REGISTRY.make_scheduler("Euler", "SGM Uniform", zsnr).config.rescale_betas_zero_snr
    with pytest.raises(UserError) as err:
        REGISTRY.make_scheduler("Heun", "Automatic", zsnr)
    assert err.value.field == "sampler_name"


def test_register_sampler_for_extensions():
    registry = samplers.SamplerRegistry()
    factory = functools.partial(EulerDiscreteScheduler, interpolation_type="log_linear")
    registry.register_sampler("Euler LL", factory, aliases=["k_euler_ll"], default_schedule="Karras")
    assert registry.sampler_names()[-1] == "Euler LL"
    scheduler = registry.make_scheduler("k_euler_ll", "Automatic", SD15)
    assert scheduler.config.interpolation_type == "log_linear" and scheduler.config.use_karras_sigmas
    assert registry.api_samplers()[-1] == {"name": "Euler LL", "aliases": ["k_euler_ll"], "options": {"scheduler": "karras"}}


def test_api_shapes():
    listed = REGISTRY.api_samplers()
    assert listed[0] == {"name": "DPM++ 2M", "aliases": ["k_dpmpp_2m"], "options": {"scheduler": "karras"}}
    assert {"name": "Euler", "aliases": ["k_euler"], "options": {}} in listed
    schedulers = REGISTRY.api_schedulers()
    assert schedulers[0] == {"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1, "need_inner_model": False}
    karras = next(s for s in schedulers if s["name"] == "karras")
    assert karras["label"] == "Karras" and karras["default_rho"] == 7.0
    assert {"name": "align_your_steps", "label": "Align Your Steps", "aliases": None, "default_rho": -1,
            "need_inner_model": False} in schedulers
    assert {"name": "DDIM CFG++", "aliases": ["ddim_cfgpp"], "options": {}} in listed
