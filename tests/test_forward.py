"""The forward pass against the reference's golden logits and latents."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.reference_check import run_case
from huginn_jax import model
from tests.conftest import reference_cases


@pytest.mark.parametrize("case", reference_cases("forward"), ids=lambda c: c["input_ids"])
def test_forward_case_within_relative_1e_5(reference, case):
    result = run_case(reference, case, rtol=1e-5)
    assert result.passed, result.detail


def test_changing_the_depth_does_not_recompile(reference):
    ids = reference.arrays["fwd0_input_ids"]
    model.forward(reference.params, ids, 2, config=reference.config, init_scale=0.0)
    compiled = model._forward._cache_size()
    for steps in (3, 7, 11):
        model.forward(reference.params, ids, steps, config=reference.config, init_scale=0.0)
    assert model._forward._cache_size() == compiled


def test_random_state_needs_a_key_and_depends_on_it(reference):
    ids = reference.arrays["fwd0_input_ids"]
    with pytest.raises(ValueError, match="pass a PRNG key"):
        model.forward(reference.params, ids, 2, config=reference.config)
    a = model.forward(reference.params, ids, 2, config=reference.config, key=jax.random.key(1)).logits
    b = model.forward(reference.params, ids, 2, config=reference.config, key=jax.random.key(1)).logits
    c = model.forward(reference.params, ids, 2, config=reference.config, key=jax.random.key(2)).logits
    assert np.array_equal(a, b) and not np.allclose(a, c)


def test_initial_state_has_the_reference_scale(reference):
    config = reference.config
    state = model.initial_state(config, jax.random.key(0), (64, 64, config.n_embd), 1.0, jnp.float32)
    # truncated normal (+-3 sigma) with sigma = sqrt(2/5): std 0.9866 sigma, bounded by 3 sigma
    sigma = np.sqrt(2 / 5)
    assert abs(float(state.std()) / (0.9866 * sigma) - 1) < 0.01
    assert float(jnp.abs(state).max()) <= 3 * sigma + 1e-6
    assert not jnp.any(model.initial_state(config, jax.random.key(0), (2, 3, 64), 0.0, jnp.float32))


@pytest.mark.parametrize("bad, message", [
    (np.zeros((1, 5), np.float32), "integer dtype"),
    (np.zeros((5,), np.int32), "rank 1"),
    (np.zeros((1, 2, 5), np.int32), "rank 3"),
    (np.full((1, 5), 256), r"lie in \[0, 256\)"),
    (np.zeros((1, 257), np.int32), "exceed the model's context of 256"),
])
def test_bad_token_ids_are_rejected(reference, bad, message):
    with pytest.raises(ValueError, match=message):
        model.forward(reference.params, bad, 2, config=reference.config, init_scale=0.0)


def test_input_states_of_the_wrong_shape_are_rejected(reference):
    ids = reference.arrays["fwd0_input_ids"]
    with pytest.raises(ValueError, match="input_states has shape"):
        model.forward(reference.params, ids, 2, config=reference.config, input_states=jnp.zeros((2, 7, 32)))


def test_huginn_0125_shapes_trace_through_forward_and_decode():
    """The released model's shapes (3.5B, bfloat16) go through the whole forward pass (traced, not run)."""
    from huginn_jax.config import HUGINN_0125
    from huginn_jax.params import abstract_params

    params = abstract_params(HUGINN_0125, jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((2, 16), jnp.int32)
    out = jax.eval_shape(lambda p, i: model._forward(p, i, 32, config=HUGINN_0125, key=jax.random.key(0),
                                                     init_scale=1.0, input_states=None), params, ids)
    assert out.logits.shape == (2, 16, 65536) and out.logits.dtype == jnp.float32
    assert out.latents.shape == (2, 16, 5280) and out.latents.dtype == jnp.bfloat16
