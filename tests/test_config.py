"""The config: presets, config.json parsing, and rejection of what we cannot run."""

import json
import math

import pytest

from huginn_jax.config import HUGINN_0125, TINY, ConfigError, HuginnConfig, preset
from huginn_jax.hf_layout import hf_shapes
from huginn_jax.params import count_params
from tests.conftest import CHECKPOINT_DIR


def fixture_config_json() -> dict:
    with open(CHECKPOINT_DIR / "config.json", encoding="utf-8") as f:
        return json.load(f)


def test_fixture_config_json_gives_the_tiny_preset():
    assert HuginnConfig.from_hf_json(CHECKPOINT_DIR) == TINY


def test_huginn_0125_preset_has_the_released_shape():
    c = preset("huginn-0125")
    assert (c.n_embd, c.n_heads, c.head_dim, c.intermediate_size, c.vocab_size) == (5280, 55, 96, 17920, 65536)
    assert (c.n_layers_in_prelude, c.n_layers_in_recurrent_block, c.n_layers_in_coda) == (2, 4, 2)
    assert (c.rope_base, c.block_size, c.effective_expected_depth) == (50000, 4096, 132)
    assert abs(c.init_std - 0.008703882797784892) < 1e-15  # the released config.json's init_values.std
    assert abs(c.embed_scale - 72.6636084983398) < 1e-12


def test_huginn_0125_parameter_count_matches_the_architecture():
    # 3,564,976,800 = embedding 346.0M + 8 blocks of 395.4M + adapter 55.76M + ln_f, counted from the
    # reference modeling file (docs/paper-notes.md, section 7.1); the tied head is not counted twice.
    assert count_params(HUGINN_0125) == 3_564_976_800
    assert sum(math.prod(shape) for shape in hf_shapes(HUGINN_0125).values()) == 3_564_976_800


def test_round_trip_through_hf_dict():
    for config in (TINY, HUGINN_0125, TINY.replace(tie_embeddings=False, qk_bias=False)):
        assert HuginnConfig.from_hf_dict(config.to_hf_dict()) == config


@pytest.mark.parametrize("changes, message", [
    (dict(n_embd=65), "not divisible by n_heads"),
    (dict(n_heads=3, num_key_value_heads=3, n_embd=63, qk_bias=False), "head_dim=21 must be even"),
    (dict(num_key_value_heads=3), "not divisible by num_key_value_heads"),
    (dict(num_key_value_heads=2), "qk_bias"),
    (dict(vocab_size=0), "vocab_size=0 must be positive"),
])
def test_inconsistent_values_are_rejected(changes, message):
    with pytest.raises(ConfigError, match=message):
        TINY.replace(**changes)


@pytest.mark.parametrize("changes, message", [
    ({"rotary_scaling": 2.0}, "unknown fields that may change the architecture: rotary_scaling"),
    ({"injection_type": "add"}, "injection_type='add' is not supported"),
    ({"norm_class_name": "LayerNorm"}, "norm_class_name"),
    ({"test_time_noise": 0.1}, "test_time_noise"),
    ({"n_layers": 9}, "n_layers=9 contradicts"),
    ({"head_dim": 8}, "head_dim=8 contradicts"),
    ({"padded_vocab_size": 512}, "padded_vocab_size=512 differs"),
    ({"init_values": {"std": 0.5}}, "init_values.std"),
    ({"n_embd": 66}, "not divisible"),
])
def test_bad_config_json_is_rejected_with_a_clear_message(changes, message):
    hf = fixture_config_json()
    hf.update(changes)
    with pytest.raises(ConfigError, match=message):
        HuginnConfig.from_hf_dict(hf)


def test_all_problems_are_listed_at_once():
    hf = fixture_config_json()
    hf.update({"foo": 1, "bias": True, "padded_vocab_size": 1})
    with pytest.raises(ConfigError) as err:
        HuginnConfig.from_hf_dict(hf)
    for part in ("foo", "bias=True", "padded_vocab_size=1"):
        assert part in str(err.value)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'huginn'"):
        preset("huginn")
