"""Checkpoint conversion (python -m convert) and restoring converted checkpoints (huginn_jax.checkpoint)."""

import json
import os
import subprocess
import sys
import textwrap
import types

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open

from convert import export_checkpoint, import_checkpoint
from convert.safetensors_io import read_header, read_tensor
from experiments.reference_check import case_name as case_name_of
from experiments.reference_check import load_fixture, run_case
from huginn_jax import checkpoint
from huginn_jax.config import TINY
from huginn_jax.hf_layout import LM_HEAD
from huginn_jax.loading import CheckpointError, load_hf_checkpoint
from huginn_jax.params import init_params
from tests.conftest import CHECKPOINT_DIR, FIXTURE_DIR
from tests.test_params_and_loading import fixture_tensors, write_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GENERATE_CASES = ("ar_fixed_4", "ar_fixed_kv_share", "ar_adaptive_kl_latest-m4")


def hf_tensors(folder) -> dict[str, np.ndarray]:
    """Every tensor of a Hugging Face layout folder (one file or shards), by official name."""
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "numpy") as f:
            for key in f.keys():
                assert key not in out, f"{key} stored twice"
                out[key] = f.get_tensor(key)
    return out


def all_params(path) -> dict:
    """Every array of a converted checkpoint, as numpy."""
    _, params = checkpoint.restore(path)
    return jax.tree.map(np.asarray, params)


def assert_nothing_written(output):
    assert not output.exists()
    leftovers = [p.name for p in output.parent.iterdir() if p.name.startswith(f".{output.name}.")]
    assert not leftovers, leftovers


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The fixture checkpoint imported as float32, with --verify."""
    out = tmp_path_factory.mktemp("converted") / "tiny-f32"
    result = import_checkpoint(str(CHECKPOINT_DIR), out, dtype="float32", verify=True, progress=False)
    assert result.verified and not result.warnings
    return out


# ---------------------------------------------------------------- import, reference, round trips

def test_converted_checkpoint_describes_itself(converted):
    names = {p.name for p in converted.iterdir()}
    assert {"config.json", "huginn_jax.json", "params", "hf_buffers.safetensors", "generation_config.json"} <= names
    description = checkpoint.read_description(converted)
    assert description["dtype"] == "float32" and description["buffers"] == ["freqs_cis"]
    assert checkpoint.read_config(converted) == TINY
    assert checkpoint.is_checkpoint(converted) and not checkpoint.is_checkpoint(CHECKPOINT_DIR)


@pytest.fixture(scope="module")
def converted_fixture(converted):
    """The reference fixture's cases with the parameters of the converted checkpoint."""
    return load_fixture(FIXTURE_DIR, checkpoint=converted)


@pytest.mark.parametrize("case_name", ["forward_fwd0", "forward_fwd1", *GENERATE_CASES])
def test_reference_check_passes_from_converted_checkpoint(converted_fixture, case_name):
    case = next(c for c in converted_fixture.cases if case_name_of(c) == case_name)
    result = run_case(converted_fixture, case)
    assert result.passed, result.detail


def test_round_trip_hf_to_orbax_to_hf_is_byte_identical(converted, tmp_path):
    exported = tmp_path / "hf"
    export_checkpoint(converted, exported, progress=False)
    assert sorted(p.name for p in exported.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    original, back = hf_tensors(CHECKPOINT_DIR), hf_tensors(exported)
    assert sorted(back) == sorted(original)
    for key, value in original.items():
        assert back[key].dtype == value.dtype and back[key].tobytes() == value.tobytes(), key
    with safe_open(str(exported / "model.safetensors"), "numpy") as f:
        assert f.metadata() == {"format": "pt"}  # transformers refuses safetensors files without it
    exported_config = json.loads((exported / "config.json").read_text())
    assert exported_config == json.loads((CHECKPOINT_DIR / "config.json").read_text())


def test_round_trip_orbax_to_hf_to_orbax_keeps_every_array(converted, tmp_path):
    export_checkpoint(converted, tmp_path / "hf", max_shard_size="200KB", progress=False)
    import_checkpoint(str(tmp_path / "hf"), tmp_path / "again", dtype="float32", progress=False)
    first, second = all_params(converted), all_params(tmp_path / "again")
    assert jax.tree.structure(first) == jax.tree.structure(second)
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: a.tobytes() == b.tobytes(), first, second)))


def test_sharded_export_with_index_and_tied_head(converted, tmp_path):
    out = tmp_path / "hf"
    result = export_checkpoint(converted, out, max_shard_size="300KB", dtype="bfloat16", tied_head=True,
                               progress=False)
    assert len(result.shards) > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(result.shards)
    tensors = hf_tensors(out)
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in tensors.values())
    assert all(os.path.getsize(out / s) <= 300_000 + 200_000 for s in result.shards)  # header + one tensor over
    np.testing.assert_array_equal(tensors[LM_HEAD], tensors["transformer.wte.weight"])
    assert tensors["transformer.wte.weight"].dtype == ml_dtypes.bfloat16
    assert tensors["freqs_cis"].dtype == np.float32  # buffers keep their dtype
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    _, loaded = load_hf_checkpoint(out, dtype=jnp.float32)  # our own loader reads it back
    np.testing.assert_array_equal(np.asarray(loaded["wte"]),
                                  fixture_tensors()["transformer.wte.weight"].astype(ml_dtypes.bfloat16)
                                  .astype(np.float32))


@pytest.mark.parametrize("stored_head", [True, False])
def test_sharded_input_with_index_stored_or_omitted_tied_head(tmp_path, stored_head):
    tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in fixture_tensors().items()}
    if stored_head:
        tensors[LM_HEAD] = tensors["transformer.wte.weight"].copy()
    source = write_checkpoint(tmp_path / "src", tensors, shards=3)
    assert (source / "model.safetensors.index.json").exists()
    out = tmp_path / "orbax"
    import_checkpoint(str(source), out, progress=False)  # bfloat16 by default
    assert checkpoint.read_description(out)["stored_tied_head"] is stored_head
    _, expected = load_hf_checkpoint(source, dtype=jnp.bfloat16)
    restored = all_params(out)
    assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), b), expected, restored))
    export_checkpoint(out, tmp_path / "back", progress=False)  # the head is stored again only if it was
    back = hf_tensors(tmp_path / "back")
    assert (LM_HEAD in back) is stored_head
    assert all(back[k].tobytes() == v.tobytes() for k, v in tensors.items())


def test_untied_head(tmp_path):
    tensors = fixture_tensors()
    tensors[LM_HEAD] = tensors["transformer.wte.weight"] * 2
    source = write_checkpoint(tmp_path / "src", tensors, config_json={"tie_embeddings": False})
    import_checkpoint(str(source), tmp_path / "orbax", dtype="float32", verify=True, progress=False)
    config, params = checkpoint.restore(tmp_path / "orbax")
    assert not config.tie_embeddings
    np.testing.assert_array_equal(np.asarray(params["lm_head"]), tensors[LM_HEAD])
    export_checkpoint(tmp_path / "orbax", tmp_path / "back", progress=False)
    assert hf_tensors(tmp_path / "back")[LM_HEAD].tobytes() == tensors[LM_HEAD].tobytes()


@pytest.mark.parametrize("source_dtype,stored_dtype", [(np.float32, "bfloat16"), (ml_dtypes.bfloat16, "float32")])
def test_bfloat16_and_float32(tmp_path, source_dtype, stored_dtype):
    tensors = {k: v.astype(source_dtype) for k, v in fixture_tensors().items()}
    source = write_checkpoint(tmp_path / "src", tensors)
    result = import_checkpoint(str(source), tmp_path / "orbax", dtype=stored_dtype, verify=True, progress=False)
    assert result.verified
    _, params = checkpoint.restore(tmp_path / "orbax")
    assert params["wte"].dtype == jnp.dtype(stored_dtype)
    np.testing.assert_array_equal(np.asarray(params["wte"]),
                                  tensors["transformer.wte.weight"].astype(jnp.dtype(stored_dtype)))
    _, as_f32 = checkpoint.restore(tmp_path / "orbax", dtype=jnp.float32)  # cast while reading
    assert as_f32["core"][0]["wqkv"].dtype == jnp.float32


def test_pytorch_bin_input(tmp_path):
    import torch

    tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in fixture_tensors().items()}
    state = {k: torch.from_numpy(v.view(np.int16)).view(torch.bfloat16) for k, v in tensors.items()}
    source = tmp_path / "src"
    source.mkdir()
    (source / "config.json").write_text((CHECKPOINT_DIR / "config.json").read_text())
    keys = sorted(state)
    torch.save({k: state[k] for k in keys[::2]}, source / "pytorch_model-00001-of-00002.bin")
    torch.save({k: state[k] for k in keys[1::2]}, source / "pytorch_model-00002-of-00002.bin")
    weight_map = {k: f"pytorch_model-0000{1 + i % 2}-of-00002.bin" for i, k in enumerate(keys)}
    (source / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    import_checkpoint(str(source), tmp_path / "orbax", verify=True, progress=False)
    assert checkpoint.read_description(tmp_path / "orbax")["source"]["format"] == "torch"
    export_checkpoint(tmp_path / "orbax", tmp_path / "back", progress=False)
    back = hf_tensors(tmp_path / "back")
    assert all(back[k].tobytes() == v.tobytes() for k, v in tensors.items())
    single = tmp_path / "single.pt"  # a bare state dict file, config given separately
    torch.save({"state_dict": state}, single)
    import_checkpoint(str(single), tmp_path / "from_pt", config_path=str(CHECKPOINT_DIR / "config.json"),
                      progress=False)
    assert checkpoint.read_description(tmp_path / "from_pt")["source"]["files"] == ["single.pt"]


def test_tokenizer_and_model_code_are_carried_both_ways(tmp_path):
    source = write_checkpoint(tmp_path / "src", fixture_tensors())
    (source / "tokenizer.json").write_text('{"version": "1.0"}')
    (source / "raven_modeling_minimal.py").write_text("# model code\n")
    import_checkpoint(str(source), tmp_path / "orbax", progress=False)
    assert (tmp_path / "orbax" / "tokenizer.json").read_text() == '{"version": "1.0"}'
    export_checkpoint(tmp_path / "orbax", tmp_path / "back", progress=False)
    assert {"tokenizer.json", "raven_modeling_minimal.py"} <= {p.name for p in (tmp_path / "back").iterdir()}


def test_params_saved_from_jax_export_for_pytorch(tmp_path):
    params = init_params(TINY, jax.random.key(3))
    checkpoint.save(tmp_path / "trained", TINY, params)
    result = export_checkpoint(tmp_path / "trained", tmp_path / "hf", progress=False)
    tensors = hf_tensors(tmp_path / "hf")
    assert LM_HEAD in tensors and result.tensors == len(tensors)  # stored like the released checkpoints
    # freqs_cis is recomputed as the reference computes it (bit-exact with torch installed)
    np.testing.assert_allclose(tensors["freqs_cis"], fixture_tensors()["freqs_cis"], rtol=0, atol=4e-6)
    _, loaded = load_hf_checkpoint(tmp_path / "hf")
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), params, loaded))


def test_restore_into_mesh_shardings(converted):
    script = textwrap.dedent(f"""
        import jax, numpy as np
        from huginn_jax import checkpoint
        mesh = jax.make_mesh((2, 2), ("data", "model"))
        config, params = checkpoint.restore({str(converted)!r}, mesh=mesh)
        _, host = checkpoint.restore({str(converted)!r}, sharding=jax.devices()[0])
        wqkv = params["core"][0]["wqkv"]
        assert tuple(wqkv.sharding.spec) == (None, "model", None, None), wqkv.sharding.spec  # heads over model
        assert wqkv.addressable_shards[0].data.shape == (64, 2, 3, 16)
        assert tuple(params["wte"].sharding.spec) == ("model", None)  # vocabulary over model, replicated over data
        assert all(np.array_equal(np.asarray(a), np.asarray(b))
                   for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(host)))
        print("ok")
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               PYTHONPATH=REPO)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]


def test_restore_names_arrays_that_do_not_match_the_config(converted, tmp_path):
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(converted, broken)
    config = json.loads((broken / "config.json").read_text())
    config["intermediate_size"] = 96
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"core.0.w_down: shape \[128, 64\] but the config needs \[96, 64\]"):
        checkpoint.restore(broken)
    with pytest.raises(CheckpointError, match="huginn_jax.json and params are missing: not a converted"):
        checkpoint.restore(CHECKPOINT_DIR)


# ---------------------------------------------------------------- bad inputs

def _missing(tensors, folder):
    del tensors["transformer.core_block.1.mlp.fc.weight"]


def _unexpected(tensors, folder):
    tensors["transformer.core_block.9.attn.proj.weight"] = np.zeros((64, 64), np.float32)


def _misshaped(tensors, folder):
    tensors["transformer.adapter.weight"] = np.zeros((64, 64), np.float32)


def _non_float(tensors, folder):
    tensors["transformer.ln_f.weight"] = np.ones(64, np.int32)


def _head_differs(tensors, folder):
    tensors[LM_HEAD] = tensors["transformer.wte.weight"] + 1


BAD_TENSORS = {
    "missing": (_missing, "transformer.core_block.1.mlp.fc.weight: missing (expected shape [256, 64])"),
    "unexpected": (_unexpected, "transformer.core_block.9.attn.proj.weight: unexpected tensor of shape [64, 64]"),
    "misshaped": (_misshaped, "transformer.adapter.weight: shape [64, 64] but the config needs [64, 128]"),
    "non_float": (_non_float, "transformer.ln_f.weight: dtype I32 is not a floating-point type"),
    "tied_head_differs": (_head_differs, "lm_head.weight differs from transformer.wte.weight"),
}


@pytest.mark.parametrize("name", sorted(BAD_TENSORS))
def test_bad_tensors_are_named_and_nothing_is_written(tmp_path, name):
    mutate, message = BAD_TENSORS[name]
    tensors = fixture_tensors()
    mutate(tensors, tmp_path)
    source = write_checkpoint(tmp_path / "src", tensors, shards=2)
    with pytest.raises(CheckpointError) as err:
        import_checkpoint(str(source), tmp_path / "out", progress=False)
    assert message in str(err.value)
    assert_nothing_written(tmp_path / "out")


def test_config_that_does_not_match_the_tensors(tmp_path):
    source = write_checkpoint(tmp_path / "src", fixture_tensors(), config_json={"intermediate_size": 96})
    with pytest.raises(CheckpointError, match=r"mlp.fc.weight: shape \[256, 64\] but the config needs \[192, 64\]"):
        import_checkpoint(str(source), tmp_path / "out", progress=False)
    assert_nothing_written(tmp_path / "out")
    source = write_checkpoint(tmp_path / "src2", fixture_tensors(), config_json={"n_heads": 5})
    with pytest.raises(CheckpointError, match="n_embd=64 is not divisible by n_heads=5"):
        import_checkpoint(str(source), tmp_path / "out", progress=False)
    assert_nothing_written(tmp_path / "out")


def test_duplicate_tensor_across_shards(tmp_path):
    from safetensors.numpy import save_file

    source = write_checkpoint(tmp_path / "src", fixture_tensors(), shards=2)
    weight_map = json.loads((source / "model.safetensors.index.json").read_text())["weight_map"]
    key = next(k for k, v in sorted(weight_map.items()) if v == "model-00002-of-00002.safetensors")
    first = source / "model-00001-of-00002.safetensors"
    with safe_open(str(first), "numpy") as f:
        part = {k: f.get_tensor(k) for k in f.keys()}
    part[key] = fixture_tensors()[key]  # now in both shards
    save_file(part, str(first))
    with pytest.raises(CheckpointError) as err:
        import_checkpoint(str(source), tmp_path / "out", progress=False)
    assert f"{key}: stored more than once (in model-00001-of-00002.safetensors, " \
           "model-00002-of-00002.safetensors)" in str(err.value)
    assert_nothing_written(tmp_path / "out")


def test_truncated_shard(tmp_path):
    source = write_checkpoint(tmp_path / "src", fixture_tensors(), shards=2)
    shard = source / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-1000])
    with pytest.raises(CheckpointError) as err:
        import_checkpoint(str(source), tmp_path / "out", progress=False)
    text = str(err.value)
    assert f"model-00002-of-00002.safetensors: truncated: the header promises {len(data)} bytes, " \
           f"the file has {len(data) - 1000}" in text
    assert "1 problem(s)" in text  # its tensors are not listed again as missing
    assert_nothing_written(tmp_path / "out")


def test_index_naming_a_missing_shard_and_every_problem_in_one_message(tmp_path):
    tensors = fixture_tensors()
    _misshaped(tensors, tmp_path)
    _unexpected(tensors, tmp_path)
    source = write_checkpoint(tmp_path / "src", tensors, shards=3)
    weight_map = json.loads((source / "model.safetensors.index.json").read_text())["weight_map"]
    keep = {weight_map["transformer.adapter.weight"], weight_map["transformer.core_block.9.attn.proj.weight"]}
    gone = next(f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)
                if f"model-0000{i}-of-00003.safetensors" not in keep)
    (source / gone).unlink()
    with pytest.raises(CheckpointError) as err:
        import_checkpoint(str(source), tmp_path / "out", progress=False)
    text = str(err.value)
    assert "3 problem(s)" in text
    assert f"{gone}: listed in the index but does not exist" in text
    assert "transformer.adapter.weight: shape [64, 64] but the config needs [64, 128]" in text
    assert "transformer.core_block.9.attn.proj.weight: unexpected tensor" in text
    assert_nothing_written(tmp_path / "out")


def test_nan_and_inf_warn_or_fail_with_strict(tmp_path):
    tensors = fixture_tensors()
    tensors["transformer.core_block.0.mlp.proj.weight"][0, :3] = [np.nan, np.inf, -np.inf]
    source = write_checkpoint(tmp_path / "src", tensors)
    with pytest.raises(CheckpointError, match=r"transformer.core_block.0.mlp.proj.weight: 3 NaN or Inf value"):
        import_checkpoint(str(source), tmp_path / "strict", strict=True, progress=False)
    assert_nothing_written(tmp_path / "strict")
    result = import_checkpoint(str(source), tmp_path / "lenient", progress=False)
    assert result.warnings == ["transformer.core_block.0.mlp.proj.weight: 3 NaN or Inf value(s) of 8192"]
    assert checkpoint.read_description(tmp_path / "lenient")["nonfinite"] == result.warnings


def test_finite_weights_beyond_bfloat16_are_found_in_the_values_as_written(tmp_path):
    """3.4e38 is a finite float32 but rounds to Inf in bfloat16: import to bfloat16 and export to
    bfloat16 must count what they write, not only what they read."""
    tensors = fixture_tensors()
    key = "transformer.core_block.1.attn.proj.weight"
    tensors[key][2, :2] = [3.4e38, -3.4e38]
    assert np.isfinite(tensors[key]).all() and np.isinf(tensors[key].astype(ml_dtypes.bfloat16)).sum() == 2
    expected = [f"{key}: 2 NaN or Inf value(s) of 4096 as written in bfloat16, 2 of them finite in the source but "
                "beyond the range of bfloat16"]
    source = write_checkpoint(tmp_path / "src", tensors)
    with pytest.raises(CheckpointError) as err:
        import_checkpoint(str(source), tmp_path / "strict", strict=True, progress=False)
    assert f"{expected[0]} (--strict)" in str(err.value)
    assert_nothing_written(tmp_path / "strict")
    result = import_checkpoint(str(source), tmp_path / "bf16", progress=False)
    assert result.warnings == expected
    assert checkpoint.read_description(tmp_path / "bf16")["nonfinite"] == expected
    assert np.isinf(all_params(tmp_path / "bf16")["core"][1]["wo"].astype(np.float32)).sum() == 2
    assert not import_checkpoint(str(source), tmp_path / "f32", dtype="float32", progress=False).warnings
    with pytest.raises(CheckpointError) as err:
        export_checkpoint(tmp_path / "f32", tmp_path / "hf", dtype="bfloat16", strict=True, progress=False)
    assert f"{expected[0]} (--strict)" in str(err.value)
    assert_nothing_written(tmp_path / "hf")
    assert export_checkpoint(tmp_path / "f32", tmp_path / "hf", dtype="bfloat16", progress=False).warnings == expected
    assert np.isinf(hf_tensors(tmp_path / "hf")[key].astype(np.float32)).sum() == 2


def test_existing_output_is_kept_unless_overwrite(converted, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists"):
        import_checkpoint(str(CHECKPOINT_DIR), out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    import_checkpoint(str(CHECKPOINT_DIR), out, overwrite=True, progress=False)
    assert checkpoint.is_checkpoint(out) and not (out / "keep.txt").exists()
    with pytest.raises(FileExistsError):
        export_checkpoint(converted, out, progress=False)


def test_failure_during_writing_leaves_nothing(tmp_path, monkeypatch):
    import convert.sources

    calls = {"n": 0}
    original = convert.sources.SafetensorsReader.__call__

    def failing(self, key):
        calls["n"] += 1
        if calls["n"] == 20:
            raise OSError("disk went away")
        return original(self, key)

    monkeypatch.setattr(convert.sources.SafetensorsReader, "__call__", failing)
    with pytest.raises(Exception, match="disk went away"):
        import_checkpoint(str(CHECKPOINT_DIR), tmp_path / "out", progress=False)
    assert_nothing_written(tmp_path / "out")


def test_hub_ids_without_network_or_huggingface_hub(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=offline))
    with pytest.raises(CheckpointError,
                       match="cannot be downloaded from the Hugging Face Hub .*Network is unreachable"):
        import_checkpoint("tomg-group-umd/huginn-0125", tmp_path / "out", progress=False)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(CheckpointError, match="needs huggingface_hub"):
        import_checkpoint("tomg-group-umd/huginn-0125", tmp_path / "out", progress=False)
    with pytest.raises(CheckpointError, match="no such file or folder"):
        import_checkpoint(str(tmp_path / "nowhere"), tmp_path / "out", progress=False)
    assert_nothing_written(tmp_path / "out")


def test_command_line_exit_codes_and_messages(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO)
    tensors = fixture_tensors()
    _missing(tensors, tmp_path)
    bad = write_checkpoint(tmp_path / "bad", tensors)
    run = subprocess.run([sys.executable, "-m", "convert", "import", f"--source={bad}", f"--output={tmp_path / 'o'}"],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert run.returncode == 1
    assert "convert import: error:" in run.stderr and "mlp.fc.weight: missing" in run.stderr
    assert_nothing_written(tmp_path / "o")
    run = subprocess.run([sys.executable, "-m", "convert", "import", f"--source={CHECKPOINT_DIR}",
                          f"--output={tmp_path / 'o'}", "--verify", "--dtype=float32"],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "verified" in run.stdout and "tensors" in run.stderr  # the progress bar
    run = subprocess.run([sys.executable, "-m", "convert", "export", f"--source={tmp_path / 'o'}",
                          f"--output={tmp_path / 'hf'}", "--max_shard_size=400KB", "--noprogress"],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    run = subprocess.run([sys.executable, "-m", "convert", "sideways"], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=300)
    assert run.returncode == 2 and "usage" in run.stderr


def test_safetensors_reader_reads_what_the_library_wrote():
    entries, metadata = read_header(CHECKPOINT_DIR / "model.safetensors")
    tensors = fixture_tensors()
    assert set(entries) == set(tensors)
    for key, entry in entries.items():
        np.testing.assert_array_equal(read_tensor(CHECKPOINT_DIR / "model.safetensors", entry), tensors[key])
