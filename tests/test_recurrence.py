"""Recurrence controllers against naive step-by-step computations with the model's own core step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from huginn_jax.model import core_step, embed_inputs, injection, iterate
from huginn_jax.recurrence import FixedDepth, StateNoise, Trajectory


def naive(reference, ids, state, steps, before=lambda s, x: x):
    """The state after `steps` core steps, one Python-level step at a time."""
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    block, _ = embed_inputs(reference.params, reference.config, jnp.asarray(ids), positions)
    injected = injection(reference.params, reference.config, block.embeds)
    for s in range(steps):
        state, _ = core_step(reference.params, reference.config, before(s, state), injected, block.where, s)
    return block, state


@pytest.mark.parametrize("schedule", ["geom", "sqrt", "line", "chi", "fixed"])
def test_state_noise_mixes_the_reference_schedule_before_every_step(reference, schedule):
    ids = reference.arrays["fwd0_input_ids"]
    config = reference.config
    state = jnp.zeros((*ids.shape, config.n_embd))
    keys = jax.random.split(jax.random.key(4), ids.shape[0])
    amount = 0.3 * config.init_std * config.embed_scale
    renorm = reference.params["core"][-1]["norm_4"]
    noise = StateNoise(FixedDepth(5), keys, amount, renorm, schedule=schedule, mean_recurrence=8)

    def before(s, x):
        draws = np.stack([np.asarray(jax.random.normal(jax.random.fold_in(k, s), x.shape[1:])) for k in keys])
        if schedule == "chi":
            a = np.array([2 * float(jax.random.uniform(jax.random.fold_in(jax.random.fold_in(k, s), 1))) * amount
                          for k in keys])
        else:
            a = np.full(len(keys), {"geom": amount / (s + 1), "sqrt": amount / np.sqrt(s + 1), "fixed": amount,
                                    "line": max(amount, (8 - s) / 8)}[schedule])
        mixed = np.asarray(x, np.float64) * (1 - a[:, None, None]) + draws * a[:, None, None]
        normed = mixed / np.sqrt((mixed ** 2).mean(-1, keepdims=True) + config.norm_eps)
        return jnp.asarray(normed * np.asarray(renorm), jnp.float32)

    block, want = naive(reference, ids, state, 5, before)
    got, _ = jax.jit(lambda b, s: iterate(reference.params, config, b, s, noise))(block, state)
    np.testing.assert_allclose(got.state, want, rtol=2e-5, atol=2e-5 * float(jnp.abs(want).max()))
    plain, _ = iterate(reference.params, config, block, state, FixedDepth(5))
    assert not np.allclose(plain.state, got.state)  # the noise changed something


def test_fixed_depth_and_trajectory_equal_the_naive_loop(reference):
    ids = reference.arrays["fwd1_input_ids"]
    state = jax.random.normal(jax.random.key(0), (*ids.shape, reference.config.n_embd))
    block, want = naive(reference, ids, state, 4)
    fixed, _ = iterate(reference.params, reference.config, block, state, FixedDepth(4))
    traced, _ = iterate(reference.params, reference.config, block, state, Trajectory(4))
    np.testing.assert_allclose(fixed.state, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(traced.memory[-1], fixed.state)
    assert (fixed.steps == 4).all()
