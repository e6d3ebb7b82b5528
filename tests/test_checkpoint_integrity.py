"""Checksums of converted checkpoints: recorded when arrays are written (import, save), verified
by restore (on one device and sharded over a mesh, where nothing is gathered) and by export, and
the handling of checkpoints written before checksums existed."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings

import jax
import numpy as np
import pytest

from convert import export_checkpoint, import_checkpoint
from huginn_jax import checkpoint
from huginn_jax.config import TINY
from huginn_jax.loading import CheckpointError
from tests.conftest import CHECKPOINT_DIR
from tests.test_bad_inputs import tree_digest
from tests.test_properties_convert import naive_checksum

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMBEDDED = os.path.join(REPO, "huginn_jax", "assets", "arithmetic-tiny")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("integrity") / "bf16"
    import_checkpoint(str(CHECKPOINT_DIR), out, progress=False)
    return out


def named(tree) -> dict[str, np.ndarray]:
    return {checkpoint.leaf_name(p): np.asarray(a) for p, a in jax.tree_util.tree_flatten_with_path(tree)[0]}


def damaged_copy(converted, folder):
    """A copy whose largest data file has 8 bytes overwritten in the middle."""
    shutil.copytree(converted, folder)
    file = max(glob.glob(str(folder / "params" / "ocdbt.process_0" / "d" / "*")), key=os.path.getsize)
    data = bytearray(open(file, "rb").read())
    data[len(data) // 2:len(data) // 2 + 8] = b"\x01\x02\x03\x04\x05\x06\x07\x08"
    open(file, "wb").write(bytes(data))
    return folder


def test_import_and_save_record_the_checksum_of_every_array_as_stored(converted, tmp_path):
    _, params = checkpoint.restore(converted, verify_checksums=False)
    recorded = checkpoint.read_description(converted)["checksums"]
    arrays = named(params)
    assert sorted(recorded) == sorted(arrays)
    assert all(recorded[k] == naive_checksum(v) for k, v in arrays.items())
    trained = jax.tree.map(lambda a: a * 3 + 1, checkpoint.restore(converted, dtype="float32")[1])  # jax arrays
    checkpoint.save(tmp_path / "saved", TINY, trained)
    recorded = checkpoint.read_description(tmp_path / "saved")["checksums"]
    assert recorded == {k: naive_checksum(v) for k, v in named(trained).items()}


def test_restore_finds_8_overwritten_bytes_and_the_switch_skips_the_check(converted, tmp_path):
    damaged = damaged_copy(converted, tmp_path / "damaged")
    with pytest.raises(CheckpointError, match="checksum 0x[0-9a-f]{8}, but 0x[0-9a-f]{8} was recorded"):
        checkpoint.restore(damaged)
    _, unchecked = checkpoint.restore(damaged, verify_checksums=False)  # faster, and blind to the damage
    _, intact = checkpoint.restore(converted)
    changed = [k for k, v in named(unchecked).items() if not np.array_equal(v, named(intact)[k])]
    assert len(changed) == 1
    with pytest.raises(CheckpointError, match=f"{changed[0]}: checksum"):
        export_checkpoint(damaged, tmp_path / "hf", progress=False)  # export verifies what it reads too
    assert not (tmp_path / "hf").exists()


def test_restore_in_another_dtype_verifies_the_stored_arrays_then_casts(converted):
    _, as_stored = checkpoint.restore(converted)
    _, as_f32 = checkpoint.restore(converted, dtype="float32")
    for key, value in named(as_f32).items():
        assert value.dtype == np.float32
        np.testing.assert_array_equal(value, named(as_stored)[key].astype(np.float32))


def test_sharded_restore_verifies_on_the_devices(converted, tmp_path):
    damaged = damaged_copy(converted, tmp_path / "damaged")
    script = textwrap.dedent(f"""
        import jax, numpy as np
        from huginn_jax import checkpoint, checksums
        from huginn_jax.loading import CheckpointError
        mesh = jax.make_mesh((2, 2), ("data", "model"))
        config, params = checkpoint.restore({str(converted)!r}, mesh=mesh)
        assert len(params["wte"].sharding.device_set) == 4 and not params["wte"].is_fully_replicated
        recorded = checkpoint.read_description({str(converted)!r})["checksums"]
        found = checksums.tree_checksums(params)
        assert {{checkpoint.leaf_name(p): v for p, v in jax.tree_util.tree_flatten_with_path(found)[0]}} == recorded
        try:
            checkpoint.restore({str(damaged)!r}, mesh=mesh)
        except CheckpointError as err:
            print("refused:", str(err).splitlines()[1])
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               PYTHONPATH=REPO)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.startswith("refused:") and "was recorded when it was written" in run.stdout, run.stdout


def test_a_checkpoint_without_checksums_restores_with_a_warning_until_they_are_added(converted, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(converted, old)
    description = json.loads((old / "huginn_jax.json").read_text())
    del description["checksums"], description["checksum_scheme"]
    (old / "huginn_jax.json").write_text(json.dumps(description))
    with pytest.warns(UserWarning, match="records no checksums .* restored unverified"):
        checkpoint.restore(old)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        checkpoint.restore(old, verify_checksums=False)  # asked not to verify: nothing to say
        export_checkpoint(old, tmp_path / "hf", progress=False)  # exports unverified
    checkpoint.add_checksums(old)
    assert checkpoint.read_description(old)["checksums"] == checkpoint.read_description(converted)["checksums"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        checkpoint.restore(old)
    before = tree_digest(old)
    with pytest.raises(CheckpointError, match="already records checksums"):
        checkpoint.add_checksums(old)
    assert tree_digest(old) == before


def test_the_embedded_model_records_checksums_and_they_hold():
    description = checkpoint.read_description(EMBEDDED)
    assert len(description["checksums"]) == len(checkpoint.stored_metadata(EMBEDDED))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, params = checkpoint.restore(EMBEDDED)
    assert {k: naive_checksum(v) for k, v in named(params).items()} == description["checksums"]
