"""The Flax module `huginn_jax.nn.Huginn` against the functional model it wraps.

The truth for a thin wrapper is the functional code: `apply` must give `forward`'s arrays bit for
bit, `init` the tree of `init_params`, the boxes the `ParamSpec` axes, Flax's shardings those of
`checkpoint.param_shardings`, and a Flax training step the gradient of the functional training loss.
"""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from huginn_jax import checkpoint, model, training
from huginn_jax.config import HUGINN_0125
from huginn_jax.nn import Huginn, logical_axis_rules
from huginn_jax.params import (ParamsError, abstract_params, count_params, init_params, is_spec,
                               param_specs)
from huginn_jax.recurrence import FixedDepth
from samplers.static_ar import generate_minimal

REPO = str(Path(__file__).resolve().parents[1])


class FirstKey(nn.Module):
    """Flax's own key derivation: the key a root module's first `make_rng(stream)` returns."""

    stream: str

    @nn.compact
    def __call__(self) -> jax.Array:
        return self.make_rng(self.stream)


def first_key(stream: str, rng: jax.Array) -> jax.Array:
    return FirstKey(stream).apply({}, rngs={stream: rng})


def assert_trees_identical(found, expected):
    assert jax.tree.structure(found) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(found), jax.tree.leaves(expected)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def is_box(x) -> bool:
    return isinstance(x, nn.LogicallyPartitioned)


@pytest.fixture(scope="module")
def ids(reference):
    return reference.arrays["fwd0_input_ids"]  # [2, 7]


@pytest.fixture(scope="module")
def initialized(reference, ids):
    """(`Huginn(config).init(key(3), ids)`, `init_params` with the key Flax hands the module's first
    parameter draw), from one compiled program (each `init_params` call compiles anew)."""
    module, config = Huginn(reference.config), reference.config
    both = jax.jit(lambda key: (module.init(key, ids, num_steps=2), init_params(config, first_key("params", key))))
    return both(jax.random.key(3))


@pytest.mark.parametrize("options", [
    dict(init_scale=0.0),
    dict(key=jax.random.key(5)),
    dict(key=jax.random.key(5), init_scale=0.5, return_trajectory=True),
    dict(input_states="random"),
], ids=["zero-state", "random-state", "trajectory", "input-states"])
def test_apply_equals_forward_bit_for_bit(reference, ids, options):
    config, params = reference.config, reference.params
    if options.get("input_states") == "random":
        options = dict(input_states=jax.random.normal(jax.random.key(1), (*ids.shape, config.n_embd)))
    expected = model.forward(params, ids, 3, config=config, **options)
    found = Huginn(config).apply({"params": params}, ids, num_steps=3, **options)
    assert_trees_identical(found, expected)
    assert (found.trajectory is not None) == bool(options.get("return_trajectory"))
    assert not np.array_equal(found.logits, model.forward(params, ids, 2, config=config, **options).logits)


def test_the_state_rng_stream_draws_the_random_state(reference, ids):
    config, params, rng = reference.config, reference.params, jax.random.key(7)
    module = Huginn(config)
    found = module.apply({"params": params}, ids, num_steps=2, rngs={"state": rng})
    expected = model.forward(params, ids, 2, config=config, key=first_key("state", rng))
    assert_trees_identical(found, expected)
    other = module.apply({"params": params}, ids, num_steps=2, rngs={"state": jax.random.key(8)})
    assert not np.allclose(found.logits, other.logits)
    with pytest.raises(ValueError, match="pass a PRNG key"):
        module.apply({"params": params}, ids, num_steps=2)


def test_jitted_apply_and_the_step_methods_equal_the_functions(reference, ids):
    config, params = reference.config, reference.params
    module, variables = Huginn(config), {"params": reference.params}
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)

    def steps(embed_inputs, iterate, predict_from_latents, lm_head, run_block):
        block, _ = embed_inputs(ids, positions)
        recurred, _ = iterate(block, jnp.zeros_like(block.embeds), FixedDepth(jnp.int32(3)))
        hidden, _ = predict_from_latents(recurred.state, block.where)
        out, _ = run_block(ids, positions, jnp.zeros_like(block.embeds), FixedDepth(jnp.int32(3)))
        return lm_head(hidden), out.latents

    def method(name):
        return lambda *args, **kwargs: module.apply(variables, *args, method=name, **kwargs)

    def function(name):
        return lambda *args, **kwargs: getattr(model, name)(params, config, *args, **kwargs)

    names = ("embed_inputs", "iterate", "predict_from_latents", "lm_head", "run_block")
    # one program: identical computations merge, so the two agree exactly unless the module's differ
    by_module, by_functions = jax.jit(lambda: (steps(*map(method, names)), steps(*map(function, names))))()
    assert_trees_identical(by_module, by_functions)
    expected = model.forward(params, ids, 3, config=config, init_scale=0.0)
    jitted = jax.jit(lambda p: module.apply({"params": p}, ids, num_steps=3, init_scale=0.0))(params)
    assert_trees_identical(jitted, expected)
    np.testing.assert_allclose(by_module[0], expected.logits, rtol=1e-5, atol=1e-5)
    lens = module.apply(variables, jnp.zeros((2, *ids.shape, config.n_embd)), method="logit_lens")
    assert_trees_identical(lens, model.logit_lens(params, jnp.zeros((2, *ids.shape, config.n_embd)), config=config))


def test_init_gives_the_tree_of_init_params(reference, initialized):
    config, (variables, expected) = reference.config, initialized
    boxed = variables["params"]
    assert set(variables) == {"params"}
    assert all(is_box(leaf) for leaf in jax.tree.leaves(boxed, is_leaf=is_box))
    assert_trees_identical(nn.meta.unbox(boxed), expected)
    assert jax.tree.structure(nn.meta.unbox(boxed)) == jax.tree.structure(reference.params)
    half = jax.eval_shape(Huginn(config, param_dtype=jnp.bfloat16).init, jax.random.key(0), np.zeros((1, 3), np.int32))
    assert nn.meta.unbox(half["params"]) == abstract_params(config, jnp.bfloat16)


def test_boxes_carry_the_param_spec_axes(reference, initialized):
    expected = jax.tree.map(lambda s: jax.sharding.PartitionSpec(*s.logical_axes), param_specs(reference.config),
                            is_leaf=is_spec)
    assert nn.get_partition_spec(initialized[0])["params"] == expected


def test_unboxed_tree_saves_restores_and_generates(reference, initialized, ids, tmp_path):
    config, params = reference.config, nn.meta.unbox(initialized[0]["params"])
    checkpoint.save(tmp_path / "ckpt", config, params)
    restored_config, restored = checkpoint.restore(tmp_path / "ckpt")
    assert restored_config == config
    assert_trees_identical(restored, params)
    found = generate_minimal(restored, ids, config=config, max_new_tokens=3, num_steps=2, init_scale=0.0)
    assert found.tokens.shape == (2, 3)
    # the first token is the argmax of the uncached forward pass's last logits
    first = model.forward(params, ids, 2, config=config, init_scale=0.0).logits[:, -1].argmax(-1)
    np.testing.assert_array_equal(found.tokens[:, 0], first)


def test_tabulate_counts_every_parameter(reference, ids):
    table = Huginn(reference.config).tabulate(jax.random.key(0), ids, num_steps=2, console_kwargs={"width": 240})
    table = re.sub(r"\x1b\[[0-9;]*m", "", table)  # rich's colours
    assert f"Total Parameters: {count_params(reference.config):,}" in table
    assert "P(vocab, embed)" in table and "wqkv" in table


def test_a_flax_training_step_has_the_functional_gradient(reference):
    config = reference.config
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (2, 9)), jnp.int32)
    mask = jnp.asarray(rng.random((2, 9)) < 0.7, jnp.float32)
    depth, key = (jnp.int32(3), jnp.int32(2)), jax.random.key(11)
    optimizer = optax.adamw(1e-2)
    module = Huginn(config)

    def flax_step(params, opt_state):
        def loss_fn(p):
            logits = module.apply({"params": p}, tokens, *depth, key, method="unrolled_logits")
            return training.masked_loss(logits, tokens, mask)

        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), loss, grads

    def functional_loss(p):
        logits = training.unrolled_logits(p, config, tokens, *depth, key)
        return training.masked_loss(logits, tokens, mask)[0]

    # one program: identical computations merge, so the two agree exactly unless the module's differ
    params = reference.params
    (new_params, loss, grads), (expected_loss, expected_grads) = jax.jit(
        lambda p: (flax_step(p, optimizer.init(p)), jax.value_and_grad(functional_loss)(p)))(params)
    assert_trees_identical(grads, expected_grads)
    assert float(loss) == float(expected_loss)
    assert all(np.any(g != 0) for g in jax.tree.leaves(grads))  # every parameter gets a gradient
    assert all(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(params)))


def test_rules_that_flax_cannot_order_are_refused(reference):
    mesh = jax.make_mesh((1,), ("x",))
    # w_gate_up has (embed, ..., mlp), w_down (mlp, embed): param_shardings lets the first dimension win
    with pytest.raises(ValueError, match=r"\['embed', 'mlp'\].*opposite orders.*w_down.*param_shardings"):
        logical_axis_rules(reference.config, mesh, {"embed": "x", "mlp": "x"})
    with pytest.raises(ValueError, match="unknown logical axes"):
        logical_axis_rules(reference.config, mesh, {"width": "x"})


def test_flax_shardings_equal_param_shardings_on_four_devices(reference):
    script = textwrap.dedent("""
        import dataclasses, flax.linen as nn, jax, numpy as np
        from huginn_jax import checkpoint
        from huginn_jax.config import HUGINN_0125
        from huginn_jax.nn import Huginn, logical_axis_rules
        from experiments.reference_check import load_fixture
        fixture = load_fixture()
        ids = fixture.arrays["fwd0_input_ids"]
        meshes = [jax.make_mesh((4,), ("model",)), jax.make_mesh((2, 2), ("data", "model"))]
        for config in (fixture.config, HUGINN_0125):  # 55 heads, 5 kv heads: not divisible by 2 or 4
            for mesh in meshes:
                module = Huginn(config)
                abstract = jax.eval_shape(module.init, jax.random.key(0), ids)
                shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh,
                                                        logical_axis_rules(config, mesh))["params"]
                assert shardings == checkpoint.param_shardings(config, mesh), (config, mesh)
        # the Flax way to initialize sharded (one block per group, through the head alone: less to compile)
        config = dataclasses.replace(fixture.config, n_layers_in_prelude=1, n_layers_in_recurrent_block=1,
                                     n_layers_in_coda=1)
        mesh, module = meshes[1], Huginn(config)
        abstract = jax.eval_shape(module.init, jax.random.key(0), ids)
        shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, logical_axis_rules(config, mesh))
        hidden = np.zeros((1, config.n_embd), np.float32)
        init = jax.jit(lambda key: module.init(key, hidden, method="lm_head"), out_shardings=shardings)
        placed = jax.tree.map(lambda a: a.sharding, nn.meta.unbox(init(jax.random.key(0)))["params"])
        assert placed == checkpoint.param_shardings(config, mesh)
        assert not placed["wte"].is_fully_replicated and not placed["core"][0]["wqkv"].is_fully_replicated
        print("ok")
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               PYTHONPATH=REPO)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
                         cwd=REPO, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "ok"


def test_a_tree_that_is_not_the_configs_is_refused_with_every_problem_named(reference, ids):
    module, params = Huginn(reference.config), reference.params
    wide = jax.eval_shape(lambda: init_params(HUGINN_0125, jax.random.key(0)))
    with pytest.raises(ParamsError, match=r"wte: shape \[65536, 5280\] but the config needs \[256, 64\]"):
        module.apply({"params": wide}, ids, num_steps=1, init_scale=0.0)
    without_core = {name: value for name, value in params.items() if name != "core"}
    with pytest.raises(ParamsError, match=r"core.0.wqkv: missing"):
        module.apply({"params": without_core}, ids, num_steps=1, init_scale=0.0)
