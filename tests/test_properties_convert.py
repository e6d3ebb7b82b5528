"""Properties of the converter's building blocks, checked on generated inputs (hypothesis):
counting NaN/Inf equals numpy's own count, the checksum equals its definition computed naively
and agrees between host and device, and any split of a checkpoint into shards round-trips bit
for bit through import and export."""

from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from safetensors.numpy import save_file

from convert import export_checkpoint, import_checkpoint
from convert.checks import CHECK_CHUNK, count_nonfinite
from huginn_jax.checksums import host_checksum, tree_checksums
from tests.conftest import CHECKPOINT_DIR
from tests.test_convert import hf_tensors
from tests.test_params_and_loading import fixture_tensors

BITS = {np.dtype(np.float32): np.uint32, np.dtype(np.float16): np.uint16, np.dtype(ml_dtypes.bfloat16): np.uint16}
SHAPES = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=9)


@st.composite
def float_arrays(draw) -> np.ndarray:
    """Arrays of float32, float16 or bfloat16 of any shape, from arbitrary bit patterns (every NaN
    payload and infinity included) or from a mix of ordinary, huge and non-finite values."""
    dtype = draw(st.sampled_from(sorted(BITS, key=str)))
    shape = draw(SHAPES)
    if draw(st.booleans()):
        bits = draw(hnp.arrays(BITS[dtype], shape))
        return bits.view(dtype)
    values = draw(hnp.arrays(np.float64, shape, elements=st.one_of(
        st.floats(-4.0, 4.0), st.sampled_from([np.nan, np.inf, -np.inf, 3.4e38, -6e4, 7e4]))))
    with np.errstate(over="ignore"):
        return values.astype(dtype)


@settings(max_examples=300, deadline=None, database=None)
@given(array=float_arrays(), chunk=st.integers(1, 40))
def test_count_nonfinite_equals_numpy_for_any_shape_dtype_and_chunking(array, chunk):
    truth = int(np.count_nonzero(~np.isfinite(array.astype(np.float64))))  # exact widening, then numpy's test
    assert count_nonfinite(array, chunk=chunk) == truth


def test_count_nonfinite_past_the_default_chunk():
    """Tensors longer than one chunk (4,194,304 elements): every chunk is counted on its own."""
    n = 2 * CHECK_CHUNK + 6
    assert n > 4_194_304
    assert count_nonfinite(np.zeros(CHECK_CHUNK + 1, np.float32)) == 0
    for dtype in (np.float32, ml_dtypes.bfloat16):
        array = np.zeros(n, dtype)
        places = [0, CHECK_CHUNK - 1, CHECK_CHUNK, CHECK_CHUNK + 1, 2 * CHECK_CHUNK, n - 1]
        array[places] = [np.nan, np.inf, -np.inf, np.nan, np.inf, np.nan]
        assert count_nonfinite(array) == len(places) == int(np.count_nonzero(~np.isfinite(array.astype(np.float32))))
        assert count_nonfinite(array.reshape(2, -1)) == len(places)
    assert count_nonfinite(np.arange(10, dtype=np.int32)) == 0


def naive_checksum(array: np.ndarray) -> int:
    """The definition, sum over i of (2i + 1) * bits_i mod 2^32, in one pass of uint64 arithmetic
    (exact: each product is below 2^64 and the sum of the reduced terms below 2^63 for fewer than
    2^31 elements)."""
    bits = np.ascontiguousarray(array).reshape(-1).view(BITS[np.dtype(array.dtype)]).astype(np.uint64)
    assert bits.size < 2**31
    terms = (2 * np.arange(bits.size, dtype=np.uint64) + 1) * bits % 2**32
    return int(np.sum(terms, dtype=np.uint64)) % 2**32


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(array=float_arrays(), chunk=st.integers(1, 40), data=st.data())
def test_checksum_equals_its_definition_on_host_and_device_and_sees_any_one_change(array, chunk, data):
    expected = naive_checksum(array)
    assert host_checksum(array, chunk=chunk) == expected
    assert tree_checksums({"a": jnp.asarray(array)})["a"] == expected
    if array.size:
        bits = np.ascontiguousarray(array).reshape(-1).view(BITS[np.dtype(array.dtype)]).copy()
        i = data.draw(st.integers(0, bits.size - 1))
        bits[i] ^= data.draw(st.integers(1, int(np.iinfo(bits.dtype).max)), label="flipped bits")
        assert host_checksum(bits.view(array.dtype)) != expected


KEYS = sorted(fixture_tensors())


@settings(max_examples=10, deadline=None, database=None)
@given(source_shards=st.lists(st.integers(0, 3), min_size=len(KEYS), max_size=len(KEYS)),
       max_shard_size=st.integers(1, 1_600_000))
def test_any_split_into_shards_round_trips_bit_for_bit(tmp_path_factory, source_shards, max_shard_size):
    """The fixture checkpoint in up to four shards (any assignment of tensors), imported as float32
    and exported with any --max_shard_size, gives every tensor back bit for bit, in shards that
    respect the size (a tensor larger than it gets a shard of its own)."""
    root = tmp_path_factory.mktemp("split")
    tensors = fixture_tensors()
    source = root / "hf"
    source.mkdir()
    for shard in sorted(set(source_shards)):
        save_file({k: tensors[k] for k, s in zip(KEYS, source_shards) if s == shard},
                  str(source / f"model-{shard}.safetensors"))
    shutil.copy(CHECKPOINT_DIR / "config.json", source / "config.json")
    weight_map = {k: f"model-{s}.safetensors" for k, s in zip(KEYS, source_shards)}
    (source / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    import_checkpoint(str(source), root / "jax", dtype="float32", progress=False)
    result = export_checkpoint(root / "jax", root / "back", max_shard_size=max_shard_size, progress=False)
    back = hf_tensors(root / "back")
    assert sorted(back) == KEYS
    for key in KEYS:
        assert back[key].dtype == tensors[key].dtype and back[key].tobytes() == tensors[key].tobytes(), key
    if len(result.shards) > 1:
        index = json.loads((root / "back" / "model.safetensors.index.json").read_text())["weight_map"]
        for shard in result.shards:
            sizes = [back[k].nbytes for k, s in index.items() if s == shard]
            assert sum(sizes) <= max_shard_size or len(sizes) == 1, (shard, sizes)
    else:
        assert sum(t.nbytes for t in tensors.values()) <= max_shard_size or len(tensors) == 1


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_checksum_of_a_large_array_is_the_same_in_chunks_and_on_device(dtype):
    """Past one host chunk the streaming sum still equals the device's one-pass sum and the definition."""
    array = np.random.default_rng(0).standard_normal(CHECK_CHUNK + 12345).astype(dtype)
    assert host_checksum(array) == naive_checksum(array) == tree_checksums([jnp.asarray(array)])[0]
