"""`generate(**options)`: picks the sampler from the option names, like the reference's
`model.generate` dispatcher, and rejects option names the chosen sampler does not know."""

from __future__ import annotations

import inspect
from typing import Any, Callable

from huginn_jax.config import HuginnConfig
from samplers.adaptive_ar import generate_with_adaptive_compute
from samplers.common import GenerateOutput
from samplers.diffusion import generate_diffusion_style
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


def sampler_name(options: dict[str, Any]) -> str:
    """The reference sampler that these options select."""
    for name, triggers in SAMPLER_TRIGGERS:
        if any(option in options for option in triggers):
            return name
    return "generate_minimal"


def generate(params: dict, input_ids: Any, *, config: HuginnConfig, **options: Any) -> GenerateOutput:
    """Runs the sampler that `options` select (see `SAMPLER_TRIGGERS`) with those options."""
    name = sampler_name(options)
    sampler = SAMPLERS[name]
    accepted = {p.name for p in inspect.signature(sampler).parameters.values()
                if p.kind == inspect.Parameter.KEYWORD_ONLY} - {"config"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise TypeError(f"{name} does not take the option(s) {unknown}; it takes {sorted(accepted)}")
    return sampler(params, input_ids, config=config, **options)
