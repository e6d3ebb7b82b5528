"""Samplers for Huginn models, with the reference's names and options.

- `generate_minimal`: static-depth autoregressive decoding.
- `generate_with_adaptive_compute`: autoregressive decoding with a per-token exit criterion.
- `generate_speculative`: self-speculative decoding (shallow drafts, verified at full depth).
- `generate_diffusion_style`: the diffusion forcing sampler (a wavefront of tokens refined in parallel).
- `generate(**options)`: picks one of them from the option names, like the reference's dispatcher.

Every sampler returns a `GenerateOutput` and streams through one protocol (`samplers.streaming`).
"""

from huginn_jax.exit_criteria import CRITERIA, ExitCriterion
from samplers.adaptive_ar import generate_with_adaptive_compute
from samplers.common import HUGINN_STOP_TOKEN_IDS, NO_TOKEN, GenerateOutput
from samplers.diffusion import PRESETS as DIFFUSION_PRESETS
from samplers.diffusion import generate_diffusion_style
from samplers.dispatch import generate, sampler_name
from samplers.sampling import GREEDY, SamplingConfig
from samplers.speculative import generate_speculative
from samplers.static_ar import generate_minimal
from samplers.streaming import Streamer

__all__ = [
    "CRITERIA", "DIFFUSION_PRESETS", "GREEDY", "HUGINN_STOP_TOKEN_IDS", "NO_TOKEN", "ExitCriterion",
    "GenerateOutput", "SamplingConfig", "Streamer", "generate", "generate_diffusion_style", "generate_minimal",
    "generate_speculative", "generate_with_adaptive_compute", "sampler_name",
]
