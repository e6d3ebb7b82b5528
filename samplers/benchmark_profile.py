"""The shape of a benchmark run, shared by the benchmark scripts (`experiments.benchmark`,
`experiments.gpu_suite`): which model, in which dtype, how long a prompt, how many new tokens and
at which recurrence. Each script keeps its own named profiles (their lengths suit its purpose)."""

from __future__ import annotations

import dataclasses
from typing import Any

from huginn_jax.config import HuginnConfig


@dataclasses.dataclass(frozen=True)
class BenchmarkProfile:
    """A model shape with random weights in `dtype`, prompts of `prompt_tokens` tokens, `new_tokens`
    generated per sequence, `num_steps` core steps per token (r)."""

    config: HuginnConfig
    dtype: Any  # a jnp dtype
    prompt_tokens: int
    new_tokens: int
    num_steps: int
