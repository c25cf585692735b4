"""A1111 sampler and schedule-type names → configured diffusers schedulers.

Samplers (names and aliases as A1111 1.10 lists them; lookup ignores case, and treats runs of
spaces and underscores alike, so "euler_a" finds "Euler a"):

=============  =============================================================  ==================
Sampler        diffusers scheduler                                            "Automatic" means
=============  =============================================================  ==================
DPM++ 2M       DPMSolverMultistep(algorithm_type="dpmsolver++", order 2)      Karras
DPM++ SDE      DPMSolverSDE                                                   Karras
DPM++ 2M SDE   DPMSolverMultistep(algorithm_type="sde-dpmsolver++", order 2)  Exponential
Euler a        EulerAncestralDiscrete                                         Uniform
Euler          EulerDiscrete                                                  Uniform
LMS            LMSDiscrete                                                    Uniform
Heun           HeunDiscrete                                                   Uniform
DPM2           KDPM2Discrete                                                  Karras
DPM2 a         KDPM2AncestralDiscrete                                         Karras
DDIM           DDIM(leading spacing, steps_offset=1, no clipping, eta 0)      its own (fixed)
UniPC          UniPCMultistep(order 3, "bh1", linspace, ends at sigma_min)    its own (fixed)
=============  =============================================================  ==================

"Automatic" follows each A1111 sampler's ``scheduler`` option; k-diffusion samplers without one
use the model's own sigmas, ``get_sigmas(n)``, which is diffusers' ``timestep_spacing="linspace"``
(A1111's "Uniform"). DDIM and UniPC are A1111 "timestep" samplers: A1111 ignores the schedule type
for them, and so do we, so an A1111 infotext reproduces the same timesteps.

Schedule types: Automatic; Uniform → ``timestep_spacing="linspace"``; Karras →
``use_karras_sigmas=True``; Exponential → ``use_exponential_sigmas=True``; SGM Uniform →
``timestep_spacing="trailing"``. Karras and Exponential also use linspace spacing, because
diffusers takes sigma_min/sigma_max from the spaced timesteps and A1111 uses the full range.
Extensions add samplers and schedule types at run time (``register_sampler``,
``register_schedule_type``; webui.extensions calls them and removes them again if the extension fails).

Where a sampler honours schedule types but its diffusers class lacks the one asked for (Euler a
has no Karras or Exponential sigmas), ``make_scheduler`` raises ``UserError`` on "scheduler"
rather than quietly giving a different image from the one A1111 would make.

Old combined names such as "DPM++ 2M Karras" are split into sampler and schedule type, the suffix
winning over the schedule type given, as A1111 does.

Seeds: create a fresh scheduler for each generation. Pass ``seed=`` to ``make_scheduler`` (the
Brownian-tree noise of DPM++ SDE is seeded there; give a list of seeds for a batch), and call
``scheduler.step(..., **step_kwargs(scheduler, generator))`` with
``generator = torch.Generator("cpu").manual_seed(seed)`` (or one generator per batch item), which
feeds the ancestral and SDE noise of the other samplers. A CPU generator gives the same image on
any device.
"""
from __future__ import annotations

import functools
import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from webui.errors import UserError

SchedulerFactory = Callable[..., SchedulerMixin]

# The keys of a model's scheduler config that describe its training noise; the rest (spacing,
# offsets, clipping) is the sampler's and the schedule type's business, as in A1111.
TRAINING_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "prediction_type",
    "rescale_betas_zero_snr",
)


@dataclass(frozen=True)
class ScheduleType:
    name: str
    label: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    default_rho: float = -1
    need_inner_model: bool = False


@dataclass(frozen=True)
class Sampler:
    name: str
    factory: SchedulerFactory
    aliases: tuple[str, ...] = ()
    default_schedule: str | None = None
    """Schedule type id that "Automatic" means; None: whatever the factory does by default."""
    uses_schedule_type: bool = True
    """False for samplers whose own timesteps A1111 always uses (DDIM, UniPC)."""
    flow_factory: SchedulerFactory | None = None
    """The sampler for flow-matching models (Flux, SD3.x), called with ``shift``; None: it has none."""
    eta: float | None = None
    """The eta it samples with (A1111's eta_ancestral 1 for ancestral and SDE samplers, eta_ddim 0 for DDIM);
    None: eta plays no part in it."""


_LINSPACE = {"timestep_spacing": "linspace"}
SCHEDULE_TYPES = (
    ScheduleType("automatic", "Automatic"),
    ScheduleType("uniform", "Uniform", _LINSPACE, need_inner_model=True),
    ScheduleType("karras", "Karras", {**_LINSPACE, "use_karras_sigmas": True}, default_rho=7.0),
    ScheduleType("exponential", "Exponential", {**_LINSPACE, "use_exponential_sigmas": True}),
    ScheduleType(
        "sgm_uniform", "SGM Uniform", {"timestep_spacing": "trailing"}, aliases=("SGMUniform",), need_inner_model=True
    ),
)

_DPMPP_2M = functools.partial(DPMSolverMultistepScheduler, algorithm_type="dpmsolver++", solver_order=2)
_DPMPP_2M_SDE = functools.partial(DPMSolverMultistepScheduler, algorithm_type="sde-dpmsolver++", solver_order=2)
_DDIM = functools.partial(
    DDIMScheduler, timestep_spacing="leading", steps_offset=1, clip_sample=False, set_alpha_to_one=False
)
# A1111's UniPC defaults; like A1111 it stops at sigma_min (t = 1/N), where diffusers' "bh1" is
# also finite (with a final sigma of zero its step size is infinite and the result NaN).
_UNIPC = functools.partial(
    UniPCMultistepScheduler,
    solver_order=3,
    solver_type="bh1",
    lower_order_final=True,
    timestep_spacing="linspace",
    final_sigmas_type="sigma_min",
)

# Flow-matching counterparts (Flux, SD3.x): the same solvers on the flow's sigmas, shifted by ``shift``.
_FLOW_DPM = dict(use_flow_sigmas=True, prediction_type="flow_prediction")


def _flow_euler(shift: float, stochastic: bool = False) -> SchedulerMixin:
    return FlowMatchEulerDiscreteScheduler(shift=shift, stochastic_sampling=stochastic)


def _flow_solver(factory: SchedulerFactory) -> SchedulerFactory:
    return lambda shift: factory(flow_shift=shift, **_FLOW_DPM)


FLOW_FACTORIES: dict[str, SchedulerFactory] = {
    "Euler": _flow_euler,
    "Euler a": functools.partial(_flow_euler, stochastic=True),
    "Heun": lambda shift: FlowMatchHeunDiscreteScheduler(shift=shift),
    "DPM++ 2M": _flow_solver(_DPMPP_2M),
    "DPM++ 2M SDE": _flow_solver(_DPMPP_2M_SDE),
    "UniPC": _flow_solver(functools.partial(UniPCMultistepScheduler, solver_order=3, solver_type="bh1")),
}

_samplers: dict[str, Sampler] = {}


def _key(name: str) -> str:
    return re.sub(r"[\s_]+", "_", name.strip().lower())


def sampler_names() -> list[str]:
    return [s.name for s in _samplers.values()]


def schedule_type_names() -> list[str]:
    return [s.label for s in SCHEDULE_TYPES]


def find_schedule_type(name: str | None) -> ScheduleType:
    """The schedule type by label, id or alias; empty means Automatic (as A1111's API)."""
    key = _key(name or "automatic")
    for schedule in SCHEDULE_TYPES:
        if key in {_key(n) for n in (schedule.name, schedule.label, *schedule.aliases)}:
            return schedule
    raise UserError(f"unknown schedule type {name!r}; choose one of: {', '.join(schedule_type_names())}", "scheduler")


def register_sampler(
    name: str,
    factory: SchedulerFactory,
    aliases: tuple[str, ...] | list[str] = (),
    *,
    default_schedule: str | None = None,
    uses_schedule_type: bool = True,
    flow_factory: SchedulerFactory | None = None,
    eta: float | None = None,
) -> None:
    """Add a sampler, or replace the one of that name.

    ``factory`` is called with diffusers scheduler config keyword arguments (a scheduler class or a
    ``functools.partial`` of one); only the arguments its signature accepts are passed.
    """
    if default_schedule is not None:
        default_schedule = find_schedule_type(default_schedule).name
    flow_factory = flow_factory or FLOW_FACTORIES.get(name)
    _samplers[_key(name)] = Sampler(name, factory, tuple(aliases), default_schedule, uses_schedule_type, flow_factory,
                                    eta)


def unregister_sampler(name: str) -> None:
    """Remove a sampler (an extension's, when the extension is disabled); an unknown name is ignored."""
    _samplers.pop(_key(name), None)


def register_schedule_type(
    name: str,
    label: str,
    kwargs: dict[str, Any],
    aliases: tuple[str, ...] | list[str] = (),
    *,
    default_rho: float = -1,
) -> None:
    """Add a schedule type, or replace the one with that id.

    ``kwargs`` are the diffusers scheduler config arguments it sets, e.g. ``{"timestep_spacing": "linspace",
    "use_beta_sigmas": True}``; a sampler whose scheduler lacks one of them refuses the schedule type.
    """
    global SCHEDULE_TYPES
    schedule = ScheduleType(_key(name), label, dict(kwargs), tuple(aliases), default_rho)
    SCHEDULE_TYPES = (*(s for s in SCHEDULE_TYPES if s.name != schedule.name), schedule)


def unregister_schedule_type(name: str) -> None:
    """Remove a schedule type by id (an extension's, when the extension is disabled)."""
    global SCHEDULE_TYPES
    SCHEDULE_TYPES = tuple(s for s in SCHEDULE_TYPES if s.name != _key(name))


register_sampler("DPM++ 2M", _DPMPP_2M, ["k_dpmpp_2m"], default_schedule="karras")
register_sampler("DPM++ SDE", DPMSolverSDEScheduler, ["k_dpmpp_sde"], default_schedule="karras", eta=1.0)
register_sampler("DPM++ 2M SDE", _DPMPP_2M_SDE, ["k_dpmpp_2m_sde"], default_schedule="exponential", eta=1.0)
register_sampler(
    "Euler a", EulerAncestralDiscreteScheduler, ["k_euler_a", "k_euler_ancestral"], default_schedule="uniform",
    eta=1.0,
)
register_sampler("Euler", EulerDiscreteScheduler, ["k_euler"], default_schedule="uniform")
register_sampler("LMS", LMSDiscreteScheduler, ["k_lms"], default_schedule="uniform")
register_sampler("Heun", HeunDiscreteScheduler, ["k_heun"], default_schedule="uniform")
register_sampler("DPM2", KDPM2DiscreteScheduler, ["k_dpm_2"], default_schedule="karras")
register_sampler("DPM2 a", KDPM2AncestralDiscreteScheduler, ["k_dpm_2_a"], default_schedule="karras", eta=1.0)
register_sampler("DDIM", _DDIM, ["ddim"], uses_schedule_type=False, eta=0.0)
register_sampler("UniPC", _UNIPC, ["unipc"], uses_schedule_type=False)


def _lookup_sampler(name: str) -> Sampler | None:
    key = _key(name)
    return next((s for s in _samplers.values() if key in {_key(n) for n in (s.name, *s.aliases)}), None)


def _split_legacy_name(name: str) -> tuple[Sampler, ScheduleType] | None:
    """Split names from before A1111 had schedule types, such as "DPM++ 2M Karras"."""
    key = _key(name)
    for schedule in SCHEDULE_TYPES[1:]:
        for suffix in (schedule.label, *schedule.aliases):
            suffix_key = "_" + _key(suffix)
            sampler = _lookup_sampler(key[: -len(suffix_key)]) if key.endswith(suffix_key) else None
            if sampler is not None:
                return sampler, schedule
    return None


def find_sampler(sampler_name: str, schedule_type: str | None = "Automatic") -> tuple[Sampler, ScheduleType]:
    """The sampler and the schedule type asked for, legacy combined names split."""
    schedule = find_schedule_type(schedule_type)
    sampler = _lookup_sampler(sampler_name or "")
    if sampler is not None:
        return sampler, schedule
    legacy = _split_legacy_name(sampler_name or "")
    if legacy is not None:
        return legacy
    raise UserError(f"unknown sampler {sampler_name!r}; choose one of: {', '.join(sampler_names())}", "sampler_name")


def resolve(sampler_name: str, schedule_type: str | None = "Automatic") -> tuple[str, str]:
    """Canonical (sampler name, schedule type label) for the infotext, e.g. ("Euler a", "Automatic")."""
    sampler, schedule = find_sampler(sampler_name, schedule_type)
    return sampler.name, schedule.label


def _accepted(factory: SchedulerFactory) -> Callable[[str], bool]:
    params = inspect.signature(factory).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return lambda key: True
    names = {p.name for p in params}
    return names.__contains__


def _schedule_kwargs(sampler: Sampler, schedule: ScheduleType, accepts: Callable[[str], bool]) -> dict[str, Any]:
    if not sampler.uses_schedule_type:
        return {}
    if schedule.name == "automatic":
        if sampler.default_schedule is None:
            return {}
        schedule = find_schedule_type(sampler.default_schedule)
    if not all(accepts(key) for key in schedule.kwargs):
        usable = [s.label for s in SCHEDULE_TYPES if all(accepts(key) for key in s.kwargs)]
        raise UserError(
            f"sampler {sampler.name} does not support schedule type {schedule.label}; "
            f"choose one of: {', '.join(usable)}",
            "scheduler",
        )
    return dict(schedule.kwargs)


def _training_kwargs(sampler: Sampler, base_config: dict[str, Any], accepts: Callable[[str], bool]) -> dict[str, Any]:
    kwargs = {k: base_config[k] for k in TRAINING_KEYS if base_config.get(k) not in (None, False)}
    unsupported = [k for k in kwargs if not accepts(k)]
    if unsupported:
        raise UserError(f"sampler {sampler.name} cannot use this model's {', '.join(unsupported)}", "sampler_name")
    return kwargs


def make_scheduler(
    sampler_name: str,
    schedule_type: str | None,
    base_config: dict[str, Any],
    *,
    seed: int | list[int] | None = None,
) -> SchedulerMixin:
    """A new scheduler for one generation.

    ``base_config`` is the model's scheduler config; only its training-noise keys are used.
    ``seed`` seeds samplers that draw their own noise (DPM++ SDE); see the module docstring.
    """
    sampler, schedule = find_sampler(sampler_name, schedule_type)
    accepts = _accepted(sampler.factory)
    kwargs = _training_kwargs(sampler, base_config, accepts)
    kwargs.update(_schedule_kwargs(sampler, schedule, accepts))
    if seed is not None and accepts("noise_sampler_seed"):
        kwargs["noise_sampler_seed"] = seed
    return sampler.factory(**kwargs)


def make_flow_scheduler(sampler_name: str, schedule_type: str | None, shift: float) -> SchedulerMixin:
    """A new scheduler for one generation of a flow-matching model, its sigmas shifted by ``shift``.

    Flow models have one schedule (Forge's "Simple"): "Automatic" is the only schedule type.
    """
    sampler, schedule = find_sampler(sampler_name, schedule_type)
    if sampler.flow_factory is None:
        usable = [s.name for s in _samplers.values() if s.flow_factory is not None]
        raise UserError(f"sampler {sampler.name} does not work with flow-matching models (Flux, SD3.x); "
                        f"choose one of: {', '.join(usable)}", "sampler_name")
    if schedule.name != "automatic":
        raise UserError(f"Flux and SD3.x models use their own flow-matching schedule; set the schedule type to "
                        f"Automatic instead of {schedule.label}", "scheduler")
    return sampler.flow_factory(shift=shift)


def step_kwargs(scheduler: SchedulerMixin, generator: torch.Generator | list[torch.Generator] | None) -> dict[str, Any]:
    """Extra arguments for ``scheduler.step``: the generator, where the scheduler draws noise."""
    if generator is not None and "generator" in inspect.signature(scheduler.step).parameters:
        return {"generator": generator}
    return {}


def api_samplers() -> list[dict[str, Any]]:
    """The body of A1111's ``GET /sdapi/v1/samplers``."""
    return [
        {
            "name": s.name,
            "aliases": list(s.aliases),
            "options": {"scheduler": s.default_schedule} if s.default_schedule not in (None, "uniform") else {},
        }
        for s in _samplers.values()
    ]


def api_schedulers() -> list[dict[str, Any]]:
    """The body of A1111's ``GET /sdapi/v1/schedulers``."""
    return [
        {
            "name": s.name,
            "label": s.label,
            "aliases": list(s.aliases) or None,
            "default_rho": s.default_rho,
            "need_inner_model": s.need_inner_model,
        }
        for s in SCHEDULE_TYPES
    ]
