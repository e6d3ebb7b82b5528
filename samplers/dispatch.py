"""`generate(**options)`: picks the sampler from the option names, like the reference's
`model.generate` dispatcher, and rejects option names the chosen sampler does not know."""

from __future__ import annotations

import inspect
from typing import Any, Callable

from huginn_jax.config import HuginnConfig
from samplers.adaptive_ar import generate_with_adaptive_compute
from samplers.common import GenerateOutput
from samplers.diffusion import generate_diffusion_style
from samplers.sampling import GREEDY, SamplingConfig
from samplers.speculative import generate_speculative
from samplers.static_ar import generate_minimal

# The reference routes on these option names, in this order.
SAMPLER_TRIGGERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("generate_with_adaptive_compute", ("criterion", "exit_threshold", "exit_evaluator")),
    ("generate_speculative", ("draft_steps", "lookahead_for_draft", "verification_threshold")),
    ("generate_diffusion_style", ("headway", "state_noise_mixing", "inner_recurrence", "freeze_strategy")),
)

SAMPLERS: dict[str, Callable[..., GenerateOutput]] = {
    "generate_minimal": generate_minimal,
    "generate_with_adaptive_compute": generate_with_adaptive_compute,
    "generate_speculative": generate_speculative,
    "generate_diffusion_style": generate_diffusion_style,
}

SHORT_NAMES = {"ar": "generate_minimal", "adaptive": "generate_with_adaptive_compute",
               "speculative": "generate_speculative", "diffusion": "generate_diffusion_style"}
"""The names the command lines use (`--sampler=diffusion`)."""


def sampler_name(options: dict[str, Any]) -> str:
    """The reference sampler that these options select."""
    for name, triggers in SAMPLER_TRIGGERS:
        if any(option in options for option in triggers):
            return name
    return "generate_minimal"


def resolve(sampler: str | None, options: dict[str, Any]) -> str:
    """The reference name of the sampler to run: `sampler` (a reference or short name), else the one
    the option names select."""
    if sampler is None:
        return sampler_name(options)
    name = SHORT_NAMES.get(sampler, sampler)
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SHORT_NAMES)} or {sorted(SAMPLERS)}")
    return name


def generate(params: dict, input_ids: Any, *, config: HuginnConfig, sampler: str | None = None,
             **options: Any) -> GenerateOutput:
    """Runs `sampler` ("ar", "adaptive", "speculative", "diffusion" or a reference name), or the
    one that the option names select (see `SAMPLER_TRIGGERS`), with those options."""
    name = resolve(sampler, options)
    sampler = SAMPLERS[name]
    accepted = {p.name for p in inspect.signature(sampler).parameters.values()
                if p.kind == inspect.Parameter.KEYWORD_ONLY} - {"config"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise TypeError(f"{name} does not take the option(s) {unknown}; it takes {sorted(accepted)}")
    return sampler(params, input_ids, config=config, **options)


SAMPLING_OPTIONS = ("do_sample", "temperature", "top_k", "top_p", "min_p", "repetition_penalty")


def parse_gen_kwargs(text: str) -> dict[str, Any]:
    """lm-eval's `--gen_kwargs` syntax, "num_steps=32,inner_recurrence=4,exit_t=0.03": values become
    bools (true/false), ints, floats or strings."""
    options: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"gen_kwargs: {item!r} is not name=value")
        options[name.strip()] = _value(value.strip())
    return options


def _value(text: str) -> Any:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def with_sampling(options: dict[str, Any], base: SamplingConfig = GREEDY) -> dict[str, Any]:
    """Options with the sampling ones (`temperature`, `top_p`, ..., as lm-eval and Hugging Face name
    them) folded into one `sampling=SamplingConfig(...)` on top of `base`; a positive temperature
    without `do_sample` samples, temperature 0 is greedy (lm-eval's convention)."""
    options = dict(options)
    given = {name: options.pop(name) for name in SAMPLING_OPTIONS if name in options}
    base = options.pop("sampling", base)
    if not given:
        return {**options, "sampling": base}
    values = {name: getattr(base, name) for name in SAMPLING_OPTIONS}
    values.update(given)
    if "do_sample" not in given and "temperature" in given:
        values["do_sample"] = float(given["temperature"]) > 0
    if not values["do_sample"] and float(values["temperature"]) == 0:
        values["temperature"] = 1.0  # greedy: the temperature is not used
    return {**options, "sampling": SamplingConfig(**values).validate()}
