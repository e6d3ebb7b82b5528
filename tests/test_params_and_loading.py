"""Parameter descriptions, checkpoint loading in the reference layout, and its error reporting."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from huginn_jax.config import TINY
from huginn_jax.hf_layout import LM_HEAD, hf_shapes, params_from_hf, params_to_hf
from huginn_jax.loading import CheckpointError, load_hf_checkpoint, tensor_files
from huginn_jax.params import abstract_params, init_params, logical_axes, param_specs
from tests.conftest import CHECKPOINT_DIR

from safetensors import safe_open


def fixture_tensors() -> dict[str, np.ndarray]:
    with safe_open(str(CHECKPOINT_DIR / "model.safetensors"), "numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def write_checkpoint(folder, tensors, shards=1, config_json=None):
    """A reference-layout checkpoint: one file, or `shards` files with an index."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(CHECKPOINT_DIR / "config.json", encoding="utf-8") as f:
        config = json.load(f)
    config.update(config_json or {})
    (folder / "config.json").write_text(json.dumps(config))
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"))
        return folder
    keys = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i::shards]
        save_file({k: tensors[k] for k in part}, str(folder / name))
        weight_map.update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def test_specs_drive_initialisation_shapes_and_axes():
    specs = param_specs(TINY)
    params = init_params(TINY, jax.random.key(0))
    assert jax.tree.map(lambda a: (a.shape, a.dtype), params) == \
        jax.tree.map(lambda s: (s.shape, s.dtype), abstract_params(TINY))
    axes = logical_axes(TINY)
    assert axes["core"][0]["wqkv"] == ("embed", "kv_heads", "qkv", "head_dim")
    assert specs["core"][0]["norm_1"].shape == (TINY.n_embd,)


def test_initialisation_follows_the_reference_scales():
    config = TINY.replace(n_embd=256, n_heads=4, num_key_value_heads=4, intermediate_size=512)
    params = init_params(config, jax.random.key(1))
    core = params["core"][0]
    std = math.sqrt(2 / (5 * 256))
    truncated = 0.9866  # the std of a normal truncated at +-3 sigma, relative to sigma
    assert abs(float(jnp.std(core["wqkv"])) / (std * truncated) - 1) < 0.02
    assert abs(float(jnp.std(core["w_gate_up"][:, 0])) / (std * truncated) - 1) < 0.02
    assert abs(float(jnp.std(core["w_gate_up"][:, 1])) / (config.out_proj_std * truncated) - 1) < 0.02
    assert abs(float(jnp.std(core["w_down"])) / (config.out_proj_std * truncated) - 1) < 0.02
    assert float(jnp.abs(core["wqkv"]).max()) <= 3 * std
    assert np.all(np.asarray(core["norm_3"]) == 1) and np.all(np.asarray(core["q_bias"]) == 0)


def test_hf_layout_round_trip_is_bit_exact():
    tensors = fixture_tensors()
    params = params_from_hf(tensors.__getitem__, TINY)
    back = params_to_hf(params, TINY)
    assert set(back) == set(tensors) - {"freqs_cis"}
    for key, value in back.items():
        assert value.dtype == tensors[key].dtype and np.array_equal(value, tensors[key]), key
    assert {k: v.shape for k, v in back.items()} == hf_shapes(TINY)


def test_sharded_checkpoint_with_index_and_stored_head(tmp_path):
    tensors = fixture_tensors()
    tensors[LM_HEAD] = tensors["transformer.wte.weight"].copy()  # as the released checkpoint stores it
    folder = write_checkpoint(tmp_path / "sharded", tensors, shards=3)
    assert len(set(tensor_files(folder).values())) == 3
    _, sharded = load_hf_checkpoint(folder)
    _, single = load_hf_checkpoint(CHECKPOINT_DIR)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), sharded, single))


def test_untied_head_is_loaded(tmp_path):
    tensors = fixture_tensors()
    tensors[LM_HEAD] = tensors["transformer.wte.weight"] * 2
    config, params = load_hf_checkpoint(write_checkpoint(tmp_path / "untied", tensors,
                                                         config_json={"tie_embeddings": False}))
    assert not config.tie_embeddings
    np.testing.assert_array_equal(np.asarray(params["lm_head"]), tensors[LM_HEAD])


def test_bfloat16_checkpoint_and_dtype_conversion(tmp_path):
    import ml_dtypes

    tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in fixture_tensors().items()}
    folder = write_checkpoint(tmp_path / "bf16", tensors)
    _, as_bf16 = load_hf_checkpoint(folder, dtype=jnp.bfloat16)
    _, as_f32 = load_hf_checkpoint(folder, dtype=jnp.float32)
    assert as_bf16["wte"].dtype == jnp.bfloat16 and as_f32["wte"].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(as_f32["wte"]), tensors["transformer.wte.weight"].astype(np.float32))


def test_every_problem_is_reported_in_one_error(tmp_path):
    tensors = fixture_tensors()
    del tensors["transformer.core_block.2.mlp.fc.weight"]
    del tensors["transformer.ln_f.weight"]
    tensors["transformer.core_block.7.attn.proj.weight"] = np.zeros((64, 64), np.float32)
    tensors["transformer.adapter.weight"] = np.zeros((64, 64), np.float32)
    folder = write_checkpoint(tmp_path / "broken", tensors)
    with pytest.raises(CheckpointError) as err:
        load_hf_checkpoint(folder)
    text = str(err.value)
    assert "4 problem(s)" in text
    assert "transformer.core_block.2.mlp.fc.weight: missing (expected shape [256, 64])" in text
    assert "transformer.ln_f.weight: missing" in text
    assert "transformer.core_block.7.attn.proj.weight: unexpected" in text
    assert "transformer.adapter.weight: shape [64, 64] but the config needs [64, 128]" in text


def test_checkpoint_that_does_not_match_its_config(tmp_path):
    folder = write_checkpoint(tmp_path / "wider", fixture_tensors(), config_json={"intermediate_size": 96})
    with pytest.raises(CheckpointError, match=r"mlp.fc.weight: shape \[256, 64\] but the config needs \[192, 64\]"):
        load_hf_checkpoint(folder)


def test_stored_head_that_contradicts_tied_embeddings(tmp_path):
    tensors = fixture_tensors()
    tensors[LM_HEAD] = tensors["transformer.wte.weight"] + 1
    with pytest.raises(CheckpointError, match="differs from transformer.wte.weight"):
        load_hf_checkpoint(write_checkpoint(tmp_path / "head", tensors))


def test_index_pointing_to_a_missing_shard(tmp_path):
    folder = write_checkpoint(tmp_path / "shards", fixture_tensors(), shards=2)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors does not exist"):
        load_hf_checkpoint(folder)


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text((CHECKPOINT_DIR / "config.json").read_text())
    with pytest.raises(CheckpointError, match="neither model.safetensors nor"):
        load_hf_checkpoint(tmp_path)
