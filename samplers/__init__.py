"""Samplers for Huginn models: static-depth AR (`generate_minimal`) and the `generate` dispatcher."""

from samplers.common import HUGINN_STOP_TOKEN_IDS, NO_TOKEN, GenerateOutput
from samplers.dispatch import UnsupportedSamplerError, generate, sampler_name
from samplers.sampling import GREEDY, SamplingConfig
from samplers.static_ar import generate_minimal

__all__ = [
    "GREEDY", "HUGINN_STOP_TOKEN_IDS", "NO_TOKEN", "GenerateOutput", "SamplingConfig", "UnsupportedSamplerError",
    "generate", "generate_minimal", "sampler_name",
]
