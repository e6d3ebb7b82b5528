"""Sampling, forward passes and training on device meshes give what one device gives.

The mesh runs happen in two subprocesses with 8 simulated CPU devices each (this process's JAX
may already have started with one): the embedded trained arithmetic model (6 heads: padded to 8
on the (1, 8) and (2, 4) meshes), a batch of 8 held-out problems of unequal lengths, every sampler
(static AR, adaptive, speculative, diffusion) on meshes (8, 1), (1, 8) and (2, 4), every cache
lookup strategy and compression rule on (2, 4), each compared with the same call on one device;
a forward pass under a context mesh and a training step. The rest (rules, padding, errors) runs here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec

from experiments.common import load_task_model
from huginn_jax import checkpoint, distributed, sharding
from huginn_jax.config import HUGINN_0125, HuginnConfig
from huginn_jax.model import forward
from huginn_jax.params import check_params, init_params
from huginn_jax.tasks.arithmetic import EMBEDDED_MODEL
from samplers.common import NO_TOKEN, GenerateOutput

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = HuginnConfig(n_embd=48, n_heads=3, num_key_value_heads=3, intermediate_size=64, vocab_size=64,
                     n_layers_in_prelude=1, n_layers_in_recurrent_block=1, n_layers_in_coda=1, block_size=64)

MESH_SCRIPT = textwrap.dedent("""
    import json, sys, time
    import jax, jax.numpy as jnp, numpy as np
    from experiments.common import load_task_model
    from huginn_jax import sharding
    from huginn_jax.model import forward
    from huginn_jax.tasks import arithmetic
    from huginn_jax.training import OptimizerConfig, init_train_state, train_step
    from samplers import (SamplingConfig, generate_diffusion_style, generate_minimal, generate_speculative,
                          generate_with_adaptive_compute)
    from samplers.streaming import collect

    group = sys.argv[1]
    start = time.perf_counter()
    config, params, tokenizer = load_task_model(arithmetic.EMBEDDED_MODEL)
    prompts = [tokenizer.encode_prompt(p) for p in arithmetic.heldout_problems()[:8]]
    common = dict(config=config, max_new_tokens=6, num_steps=8, stop_token_ids=[tokenizer.end_id],
                  key=jax.random.key(7))
    sampled = SamplingConfig(do_sample=True, temperature=1.5, top_k=0)
    adaptive = dict(criterion="kl", exit_threshold=0.005)
    every = ["8,1", "1,8", "2,4"]
    # strategies whose cache has the latest-m4 layout (the strategy is data) share its compiled programs
    same_layout = ["full", "available-m4", "always-last-m4", "skip", "latest-m4-compress-anchor"]
    groups = {  # name -> (sampler, options, meshes); two groups, run side by side in two processes
        "a": {
            "ar": (generate_minimal, dict(sampling=sampled, init_scale=1.0,
                                          cache_lookup_strategy="latest-m4-compress-s2"), every),
            "speculative": (generate_speculative, dict(draft_steps=2, lookahead_for_draft=3, sampling=sampled),
                            every),
            "diffusion": (generate_diffusion_style, dict(max_wavefront=16, inner_recurrence=2, sampling=sampled),
                          every),
        },
        "b": {
            "adaptive_latest-m4": (generate_with_adaptive_compute, dict(adaptive, cache_lookup_strategy="latest-m4"),
                                   every),
            **{f"adaptive_{s}": (generate_with_adaptive_compute, dict(adaptive, cache_lookup_strategy=s), ["2,4"])
               for s in same_layout + ["randomized", "latest-m4-compress-s4", "latest-m4-compress-r4"]},
        },
    }
    meshes = {m: sharding.make_mesh(tuple(map(int, m.split(",")))) for m in every}
    placed = {m: sharding.shard_params(params, config, mesh) for m, mesh in meshes.items()}
    results = {"runs": {}, "timing": {}, "stored_heads": {m: c.stored_heads for m, (c, _) in placed.items()}}
    for name, (sampler, options, on) in groups[group].items():
        options = {**common, **options}
        tick = time.perf_counter()
        one = sampler(params, prompts, **options)
        results["timing"][name] = time.perf_counter() - tick
        for m in on:
            tick = time.perf_counter()
            streamer, streamed = collect()
            padded, sharded = placed[m]
            out = sampler(sharded, prompts, **{**options, "config": padded}, mesh=meshes[m], streamer=streamer)
            stats = {k: v == one.stats[k] if isinstance(v, list) else bool(np.array_equal(v, one.stats[k]))
                     for k, v in out.stats.items() if k != "cache_allocated_mb"}
            results["runs"][f"{name}@{m}"] = dict(
                tokens=bool(np.array_equal(out.tokens, one.tokens)),
                steps=bool(np.array_equal(out.recurrence_steps, one.recurrence_steps)),
                stats=stats, streamed=streamed == out.sequences(), generated=int(out.lengths.sum()),
                varied_steps=int(len(np.unique(one.recurrence_steps[one.tokens >= 0]))))
            results["timing"][f"{name}@{m}"] = time.perf_counter() - tick

    if group == "a":
        # the mesh in context instead of an argument, and a forward pass
        tick = time.perf_counter()
        ids = np.asarray(prompts[0][:6] * 8, np.int32).reshape(8, 6)
        single = forward(params, ids, 4, config=config, key=jax.random.key(1))
        with jax.set_mesh(jax.make_mesh((2, 4), ("data", "model"))):  # Explicit axes, as jax.make_mesh makes them
            out = forward(params, ids, 4, config=config, key=jax.random.key(1))
        results["forward"] = dict(error=float(np.abs(np.asarray(out.logits) - np.asarray(single.logits)).max()),
                                  scale=float(np.abs(np.asarray(single.logits)).max()),
                                  spec=[str(a) for a in out.logits.sharding.spec])
        results["timing"]["forward"] = time.perf_counter() - tick
    else:
        # one training step, data x tensor parallel, against one device
        tick = time.perf_counter()
        optimizer = OptimizerConfig(warmup_steps=1, total_steps=10).build()
        tokens = np.asarray([(p * 4)[:16] for p in prompts], np.int32)
        mask = np.ones_like(tokens, np.float32)
        def step(state, mesh=None):
            with sharding.use(mesh):
                return train_step(state, tokens, mask, np.int32(2), np.int32(2), jax.random.key(3), config=config,
                                  optimizer=optimizer)
        state, metrics = step(init_train_state(jax.tree.map(jnp.copy, params), optimizer))  # train_step donates
        mesh = sharding.make_mesh((4, 2))  # training pads no heads: a model axis that divides 6
        shardings = sharding.shardings_like_params(init_train_state(params, optimizer), config, mesh)
        sharded = jax.device_put(init_train_state(params, optimizer), shardings)
        tokens = jax.device_put(tokens, sharding.batch_sharding(mesh, 2))
        mask = jax.device_put(mask, sharding.batch_sharding(mesh, 2))
        state_m, metrics_m = step(sharded, mesh)
        named = {jax.tree_util.keystr(p): a for p, a in jax.tree_util.tree_flatten_with_path(state_m)[0]}
        specs = {k: tuple(map(str, a.sharding.spec)) for k, a in named.items() if "core'][0]['wqkv" in k}
        specs = {k: spec[:max([i + 1 for i, part in enumerate(spec) if part != "None"], default=0)]
                 for k, spec in specs.items()}  # trailing replicated dimensions may be left out
        results["training"] = dict(
            loss=[float(metrics["loss"]), float(metrics_m["loss"])],
            params=max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in
                       zip(jax.tree.leaves(state.params), jax.tree.leaves(state_m.params))),
            wqkv_specs=sorted(set(specs.values())), wqkv_copies=len(specs))
        results["timing"]["training"] = time.perf_counter() - tick
    results["seconds"] = time.perf_counter() - start
    print(json.dumps(results))
""")


@pytest.fixture(scope="module")
def mesh_results():
    """Both groups of MESH_SCRIPT, each in its own process (compiling is most of the time, and
    one process compiles on one core), merged. Both compile with LLVM's cheap optimization level:
    the single-device and the mesh programs alike, so their results must still agree exactly."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, XLA_FLAGS=(
        "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
        "--xla_llvm_disable_expensive_passes=true"))
    children = [subprocess.Popen([sys.executable, "-c", MESH_SCRIPT, group], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=env, cwd=REPO) for group in ("a", "b")]
    merged: dict = {"runs": {}, "timing": {}}
    for child in children:
        out, err = child.communicate(timeout=900)
        assert child.returncode == 0, err[-5000:]
        part = json.loads(out.strip().splitlines()[-1])
        merged["runs"].update(part.pop("runs"))
        merged["timing"].update(part.pop("timing"))
        merged.update(part)
    print("mesh timing", json.dumps(merged["timing"]))
    return merged


def test_every_sampler_on_every_mesh_gives_the_tokens_of_one_device(mesh_results):
    runs = mesh_results["runs"]
    assert mesh_results["stored_heads"] == {"8,1": 6, "1,8": 8, "2,4": 8}  # 2 zero heads where MODEL > 1
    for sampler in ("ar", "adaptive_latest-m4", "speculative", "diffusion"):
        assert {name.split("@")[1] for name in runs if name.split("@")[0] == sampler} == {"8,1", "1,8", "2,4"}
    for name, result in runs.items():
        assert result["tokens"] and result["steps"], name
        assert all(result["stats"].values()), (name, result["stats"])
        assert result["streamed"], name
        assert result["generated"] > 8, name  # the rows generate (more than a stop token each)
    assert runs["adaptive_latest-m4@2,4"]["varied_steps"] > 1  # tokens exit at different depths


def test_every_cache_strategy_on_a_data_and_model_mesh(mesh_results):
    strategies = {name.split("@")[0].removeprefix("adaptive_") for name in mesh_results["runs"]
                  if name.startswith("adaptive_") and name.endswith("@2,4")}
    assert strategies == {"full", "latest-m4", "available-m4", "always-last-m4", "skip", "randomized",
                          "latest-m4-compress-anchor", "latest-m4-compress-s4", "latest-m4-compress-r4"}


def test_forward_under_a_context_mesh_and_a_training_step(mesh_results):
    fwd = mesh_results["forward"]
    assert fwd["error"] <= 1e-5 * fwd["scale"]
    assert fwd["spec"][0] == "data"
    train = mesh_results["training"]
    assert abs(train["loss"][0] - train["loss"][1]) <= 1e-5 * abs(train["loss"][0])
    assert train["params"] < 1e-5
    # the parameters and both of Adam's moments split by heads, rows over data
    assert train["wqkv_specs"] == [["None", "model"]] and train["wqkv_copies"] == 3


# ---------------------------------------------------------------- rules, padding, errors (one device)

def test_default_rules_follow_the_mesh_axes():
    two = AbstractMesh((2, 4), ("data", "model"))
    assert sharding.default_rules(two) == {"batch": "data", "vocab": "model", "heads": "model", "kv_heads": "model",
                                           "mlp": "model"}
    assert sharding.default_rules(AbstractMesh((8,), ("data",))) == {"batch": "data"}
    assert sharding.default_rules(AbstractMesh((4,), ("x",)))["heads"] == "x"
    assert sharding.logical_spec(("batch", None, "heads", None), (4, 3, 6, 2), two,
                                 sharding.default_rules(two)) == PartitionSpec("data", None, None, None)  # 6 % 4


def test_head_padding_is_the_same_function_and_reverts(tmp_path):
    params = init_params(SMALL, jax.random.key(0))
    ids = np.arange(14, dtype=np.int32).reshape(2, 7) % SMALL.vocab_size
    padded_config, padded = sharding.pad_heads(params, SMALL, 5)
    check_params(padded, padded_config)
    assert padded["core"][0]["wqkv"].shape == (48, 8, 3, 16) and padded_config.head_dim == SMALL.head_dim
    block = padded["core"][0]
    assert not np.any(np.asarray(block["wo"][3:])) and not np.any(np.asarray(block["q_bias"][3:]))
    want = forward(params, ids, 3, config=SMALL, init_scale=0.0).logits
    got = forward(padded, ids, 3, config=padded_config, init_scale=0.0).logits
    assert float(jnp.abs(got - want).max()) <= 1e-6 * float(jnp.abs(want).max())
    back_config, back = sharding.unpad_heads(padded, padded_config)
    assert back_config == SMALL and jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), back, params))
    broken = jax.tree.map(lambda a: a, padded)
    broken["core"][0]["wo"] = broken["core"][0]["wo"].at[4].set(1.0)
    with pytest.raises(ValueError, match=r"core.0.wo: the heads beyond 3 along its heads axis are not zero"):
        sharding.unpad_heads(broken, padded_config)
    with pytest.raises(ValueError, match="zero kv heads for sharding.*unpad_heads"):
        checkpoint.save(tmp_path / "padded", padded_config, padded)
    assert "kv_head_padding" not in padded_config.to_hf_dict()
    assert HuginnConfig.from_hf_dict(padded_config.to_hf_dict()) == SMALL


def test_huginn_0125_pads_55_heads_to_what_the_model_axis_divides():
    for model, stored in ((1, 55), (2, 56), (4, 56), (8, 56), (16, 64), (5, 55)):
        mesh = AbstractMesh((1, model), ("data", "model"))
        assert HUGINN_0125.replace(kv_head_padding=sharding.head_padding(HUGINN_0125, mesh)).stored_heads == stored


def test_bad_meshes_and_batches_say_what_to_change():
    with pytest.raises(ValueError, match=r"--mesh='2x4' must be DATA,MODEL"):
        sharding.parse_mesh("2x4")
    with pytest.raises(ValueError, match=r"needs 8 devices, but 1 are available.*data x model <= 1"):
        sharding.make_mesh((2, 4))
    with pytest.raises(ValueError, match=r"a batch of 3 prompts does not split over the mesh's data axis of 2: pass a "
                                         r"multiple of 2 prompts, or a mesh whose data axis divides 3"):
        sharding.check_batch(3, AbstractMesh((2, 4), ("data", "model")))
    with pytest.raises(ValueError, match=r"model axis of 3 devices does not divide mlp=64 of coda.0.w_down: "
                                         r"choose a mesh whose model axis divides 64"):
        sharding.check_divides(SMALL, AbstractMesh((1, 3), ("data", "model")), {"mlp": "model"})
    with pytest.raises(ValueError, match="unknown logical axes"):
        sharding.param_shardings(SMALL, jax.make_mesh((1,), ("model",)), {"width": "model"})


def test_distributed_shares_and_refusals():
    assert [distributed.share(10, i, 4) for i in range(4)] == [slice(0, 3), slice(3, 6), slice(6, 8), slice(8, 10)]
    assert distributed.share(1, 1, 2) == slice(1, 1)  # a process may get nothing
    assert distributed.gather({"a": 1}) == [{"a": 1}]
    with pytest.raises(distributed.DistributedError, match="--coordinator_address needs --num_processes and "
                                                           "--process_id too"):
        distributed.initialize("127.0.0.1:1234")
    with pytest.raises(distributed.DistributedError, match=r"--process_id=2 must lie in \[0, 2\)"):
        distributed.initialize("127.0.0.1:1234", 2, 2)
    with pytest.raises(distributed.DistributedError, match="must be HOST:PORT"):
        distributed.initialize("localhost", 2, 1)
    with pytest.raises(distributed.DistributedError, match=r"no coordinator answers at 127.0.0.1:\d+ after 1 s.*"
                                                           "start process 0"):
        distributed.initialize(f"127.0.0.1:{_free_port()}", 2, 1, timeout_s=1)


def test_outputs_of_shares_concatenate_in_order():
    a = GenerateOutput(tokens=np.array([[1, 2, 3]]), lengths=np.array([3]), recurrence_steps=np.array([[4, 4, 4]]),
                       stats={"rounds": np.array([2]), "accepted_per_round": [[1, 0]]})
    b = GenerateOutput(tokens=np.array([[5], [6]]), lengths=np.array([1, 1]), recurrence_steps=np.array([[4], [4]]),
                       stats={"rounds": np.array([1, 1]), "accepted_per_round": [[0], [2]]})
    both = GenerateOutput.concatenate([a, None, b])
    assert both.tokens.tolist() == [[1, 2, 3], [5, NO_TOKEN, NO_TOKEN], [6, NO_TOKEN, NO_TOKEN]]
    assert both.recurrence_steps.tolist() == [[4, 4, 4], [4, 0, 0], [4, 0, 0]]
    assert both.sequences() == [[1, 2, 3], [5], [6]] and both.stats["accepted_per_round"] == [[1, 0], [0], [2]]


def test_the_embedded_model_needs_padding_on_a_model_axis_of_four():
    config, _, _ = load_task_model(EMBEDDED_MODEL)
    assert sharding.head_padding(config, AbstractMesh((2, 4), ("data", "model"))) == 2


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
