"""Huginn's training recipe: the recurrence draw, truncated backprop and the optimizer step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from huginn_jax.config import HuginnConfig
from huginn_jax.model import forward
from huginn_jax.params import init_params
from huginn_jax.training import (OptimizerConfig, init_train_state, masked_loss, sample_recurrence, train_step,
                                 unrolled_logits)

CONFIG = HuginnConfig(n_embd=32, n_heads=2, num_key_value_heads=2, intermediate_size=48, vocab_size=64,
                      n_layers_in_prelude=1, n_layers_in_recurrent_block=2, n_layers_in_coda=1, block_size=32,
                      mean_recurrence=6, mean_backprop_depth=3)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, CONFIG.vocab_size, (3, 10)).astype(np.int32)
    mask = (rng.random((3, 10)) < 0.6).astype(np.float32)
    return tokens, mask


def test_recurrence_draw_follows_the_poisson_lognormal_scheme():
    rng = np.random.default_rng(0)
    draws = np.array([sample_recurrence(rng, 32, 8) for _ in range(20000)])
    total = draws.sum(1)
    # Poisson(lambda) + 1 with E[lambda] = 32: mean 33; Var = E[lambda] + Var[lambda] = 32 + 32^2 (e^0.25 - 1)
    assert abs(total.mean() - 33) < 0.3
    assert abs(total.var() - (32 + 32 ** 2 * (np.exp(0.25) - 1))) < 0.06 * total.var()
    assert total.min() >= 1
    assert np.array_equal(draws[:, 1], np.minimum(total, 8))  # the last (at most) 8 steps carry gradients
    assert np.array_equal(draws[:, 0], np.maximum(total - 8, 0))


@pytest.mark.parametrize("no_grad, grad", [(4, 3), (0, 2), (5, 0)])
def test_unrolled_forward_equals_the_inference_forward_at_the_same_depth(batch, no_grad, grad):
    params = init_params(CONFIG, jax.random.key(1))
    key = jax.random.key(7)
    logits = unrolled_logits(params, CONFIG, jnp.asarray(batch[0]), jnp.int32(no_grad), jnp.int32(grad), key)
    want = forward(params, batch[0], no_grad + grad, config=CONFIG, key=key).logits
    np.testing.assert_allclose(logits, want, rtol=2e-5, atol=2e-5)


def test_gradients_flow_only_through_the_last_steps(batch):
    """The gradient equals that of a forward pass started from the (constant) state after the
    steps without gradient: truncated backprop, computed independently through `forward`."""
    params = init_params(CONFIG, jax.random.key(2))
    tokens, mask = jnp.asarray(batch[0]), jnp.asarray(batch[1])
    key = jax.random.key(3)
    no_grad, grad = 3, 2

    def recipe_loss(p):
        logits = unrolled_logits(p, CONFIG, tokens, jnp.int32(no_grad), jnp.int32(grad), key)
        return masked_loss(logits, tokens, mask)[0]

    start = forward(params, tokens, no_grad, config=CONFIG, key=key, return_trajectory=True).trajectory[-1]

    def truncated_loss(p):
        logits = forward(p, tokens, grad, config=CONFIG, input_states=start, return_trajectory=True).logits
        return masked_loss(logits, tokens, mask)[0]

    got, want = jax.grad(recipe_loss)(params), jax.grad(truncated_loss)(params)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6), got, want)
    assert float(jnp.abs(got["core"][0]["wqkv"]).max()) > 0

    # no step with gradient: the core, adapter and prelude get none, the coda and embedding do
    none = jax.grad(lambda p: masked_loss(unrolled_logits(p, CONFIG, tokens, jnp.int32(4), jnp.int32(0), key),
                                          tokens, mask)[0])(params)
    for name in ("core", "prelude"):
        assert all(float(jnp.abs(leaf).max()) == 0 for leaf in jax.tree.leaves(none[name]))
    assert float(jnp.abs(none["adapter"]).max()) == 0
    assert float(jnp.abs(none["coda"][0]["w_down"]).max()) > 0


def test_masked_loss_matches_a_naive_computation():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    tokens = rng.integers(0, 7, (2, 5))
    mask = np.array([[0, 1, 1, 0, 0], [1, 0, 0, 1, 0]], np.float32)
    loss, metrics = masked_loss(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(mask))
    terms, hits = [], []
    for b, t in zip(*np.nonzero(mask)):
        z = logits[b, t].astype(np.float64)
        terms.append(np.log(np.exp(z - z.max()).sum()) + z.max() - z[tokens[b, t + 1]])
        hits.append(z.argmax() == tokens[b, t + 1])
    assert float(loss) == pytest.approx(np.mean(terms), rel=1e-5)
    assert float(metrics["token_accuracy"]) == pytest.approx(np.mean(hits))


def test_optimizer_steps_learn_a_fixed_batch(batch):
    """The whole update (clipping, AdamW, schedule) drives the loss down on a batch it sees again."""
    tokens, mask = batch
    optimizer_config = OptimizerConfig(learning_rate=3e-3, warmup_steps=5, total_steps=40)
    optimizer = optimizer_config.build()
    state = init_train_state(init_params(CONFIG, jax.random.key(5)), optimizer)
    rng = np.random.default_rng(0)
    losses = []
    for step in range(40):
        no_grad, grad = sample_recurrence(rng, CONFIG.mean_recurrence, CONFIG.mean_backprop_depth)
        state, metrics = train_step(state, tokens, mask, np.int32(no_grad), np.int32(grad), jax.random.key(step),
                                    config=CONFIG, optimizer=optimizer)
        losses.append(float(metrics["loss"]))
    assert int(state.step) == 40
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    assert optimizer_config.schedule()(0) == 0 and optimizer_config.schedule()(5) == pytest.approx(3e-3)
    assert optimizer_config.schedule()(40) == pytest.approx(3e-4)
