"""The analytic roofline (huginn_jax.roofline) against the parameter tree, the cache's own entry
size and XLA's FLOP count."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from huginn_jax import roofline
from huginn_jax.config import CPU_BENCHMARK, HUGINN_0125, TINY
from huginn_jax.kv_cache import entry_bytes
from huginn_jax.layers import TokenPositions
from huginn_jax.model import core_step, embed_inputs, injection, lm_head, predict_from_latents
from huginn_jax.params import abstract_params, init_params

UNTIED = TINY.replace(tie_embeddings=False)


def tree_bytes(tree) -> int:
    return sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))


@pytest.mark.parametrize("config", [TINY, UNTIED, HUGINN_0125], ids=["tiny", "untied", "huginn-0125"])
def test_weight_bytes_are_the_parameter_tree(config):
    assert roofline.weight_bytes(config, jnp.bfloat16) == tree_bytes(abstract_params(config, jnp.bfloat16))


@pytest.mark.parametrize("config", [TINY, UNTIED, HUGINN_0125], ids=["tiny", "untied", "huginn-0125"])
def test_a_token_reads_every_weight_once_per_use(config):
    """One AR token at depth 1 reads every parameter once (the embedding only for its rows, when
    the head is a separate matrix); every further step reads the core and the adapter's state
    half once more."""
    params = abstract_params(config, jnp.float32)
    one = roofline.step_cost(config, jnp.float32, 1, roofline.static_ar_token(1, 64))
    unread = 0 if config.tie_embeddings else tree_bytes(params["wte"])
    assert one.weight_bytes == tree_bytes(params) - unread
    per_step = tree_bytes(params["core"]) + config.n_embd ** 2 * 4  # adapter[:E] @ state
    deeper = roofline.step_cost(config, jnp.float32, 1, roofline.static_ar_token(5, 64))
    assert deeper.weight_bytes - one.weight_bytes == 4 * per_step


@pytest.mark.parametrize("batch, context, r", [(1, 100, 32), (7, 3, 4)])
def test_cache_bytes_are_every_layer_application_reading_the_context(batch, context, r):
    config = HUGINN_0125
    applications = config.n_layers_in_prelude + r * config.n_layers_in_recurrent_block + config.n_layers_in_coda
    cost = roofline.step_cost(config, jnp.bfloat16, batch, roofline.static_ar_token(r, context))
    assert cost.cache_bytes == applications * context * batch * entry_bytes(config, jnp.bfloat16)
    assert cost.tokens == batch


def test_batch_shares_the_weights_not_the_cache():
    one = roofline.step_cost(TINY, jnp.float32, 1, roofline.diffusion_step(4, 8, 1.0, 50))
    many = roofline.step_cost(TINY, jnp.float32, 32, roofline.diffusion_step(4, 8, 1.0, 50))
    assert many.weight_bytes == one.weight_bytes
    assert many.cache_bytes == 32 * one.cache_bytes and many.flops == 32 * one.flops and many.tokens == 32


def test_flops_match_xla_for_a_block_pass():
    """A pass of T positions at depth 1, every position decoded, without cache (attention over the
    block's own T positions): the analytic count against XLA's cost analysis of the same program
    on CPU, which counts every multiply-add (and the elementwise work the roofline leaves out)."""
    config, t = CPU_BENCHMARK, 64
    params = init_params(config, jax.random.key(0))

    def one_pass(params, tokens, state):
        positions = jnp.broadcast_to(jnp.arange(t), tokens.shape)
        block, _ = embed_inputs(params, config, tokens, positions)
        state, _ = core_step(params, config, state, injection(params, config, block.embeds),
                             TokenPositions.create(positions, config), 0)
        hidden, _ = predict_from_latents(params, config, state, block.where)
        return lm_head(params, config, hidden)

    tokens = jnp.zeros((1, t), jnp.int32)
    state = jnp.zeros((1, t, config.n_embd), jnp.float32)
    cost = jax.jit(one_pass).lower(params, tokens, state).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    analytic = roofline.step_cost(config, jnp.float32, 1, roofline.SamplerStep(
        "pass", (roofline.Pass(t, 1, t, t),), 1.0)).flops
    assert analytic <= cost["flops"] <= 1.05 * analytic


def test_the_bound_is_the_slower_of_memory_and_compute():
    chip = roofline.CHIPS["H100"]
    cost = roofline.Cost(weight_bytes=3.35e12, cache_bytes=0.0, flops=989e12 / 2, tokens=10.0)
    assert cost.seconds(chip) == pytest.approx(1.0) and cost.tokens_per_second(chip) == pytest.approx(10.0)
    compute_bound = roofline.Cost(weight_bytes=0.0, cache_bytes=3.35e11, flops=989e12 * 2, tokens=10.0)
    assert compute_bound.seconds(chip) == pytest.approx(2.0)
    assert compute_bound.seconds(chip, chips=4) == pytest.approx(0.5)


@pytest.mark.parametrize("kind, name", [("TPU v5 lite", "v5e"), ("TPU v6 lite", "v6e"), ("TPU v5", "v5p"),
                                        ("TPU v4", "v4"), ("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA H200", "H200"),
                                        ("NVIDIA A100-SXM4-40GB", "A100-40GB")])
def test_device_kinds_name_their_chips(kind, name):
    assert roofline.chip_for(kind) is roofline.CHIPS[name]


def test_unknown_devices_have_no_roofline():
    assert roofline.chip_for("cpu") is None and roofline.chip_for("NVIDIA A100-SXM4-80GB") is None


def test_huginn_0125_static_ar_bound_on_an_a100():
    """The number BENCHMARKS.md quotes: 107 GB of weights per token at r=32, so an A100-40GB
    (1.555 TB/s) decodes at most ~14.5 tokens/s at batch 1, below the paper's 36.1."""
    cost = roofline.step_cost(HUGINN_0125, jnp.bfloat16, 1, roofline.static_ar_token(32, 512))
    assert 106e9 < cost.weight_bytes < 108e9
    assert 14.0 < cost.tokens_per_second(roofline.CHIPS["A100-40GB"]) < 14.6
    assert np.isclose(cost.tokens, 1.0)
