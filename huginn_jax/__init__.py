"""huginn-jax: recurrent-depth (Huginn) language models in JAX."""

from huginn_jax.config import HUGINN_0125, PRESETS, TINY, ConfigError, HuginnConfig, preset
from huginn_jax.kv_cache import CACHE_STRATEGIES, CacheLayout, KVCache
from huginn_jax.loading import CheckpointError, load_hf_checkpoint
from huginn_jax.model import ForwardOutput, forward, logit_lens
from huginn_jax.params import init_params, param_specs

__all__ = [
    "CACHE_STRATEGIES", "CacheLayout", "CheckpointError", "ConfigError", "ForwardOutput", "HUGINN_0125",
    "HuginnConfig", "KVCache", "PRESETS", "TINY", "forward", "init_params",
    "load_hf_checkpoint", "logit_lens", "param_specs", "preset",
]
