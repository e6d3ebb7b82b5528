"""Checks huginn-jax against golden outputs of the official PyTorch implementation.

Runs every case of each fixture's `cases.json` (by default both fixtures in tests/fixtures: the
tiny model's forward passes and samplers, and its KV-cache strategies) and prints one row per case:
- forward cases: logits and latents at each listed depth (and from given input states) within a
  relative error of `--rtol` (largest absolute difference over the largest reference magnitude);
- generate cases: the greedy tokens, the statistics where the case records them, and the cache's
  filled memory (`cache_memory_mb`, the reference's `get_memory_usage()`) where it records that.
A case that cannot run (options a sampler does not take, a strategy it does not know, any error)
fails and says why; nothing is skipped. Ends with `reference_check: P/N cases pass` over all
fixtures and exits non-zero unless all pass.

With `--mesh=DATA,MODEL` every case runs on a device mesh (`huginn_jax.sharding`: rows over DATA
devices, heads, MLP and vocabulary over MODEL, heads padded where MODEL does not divide them),
each prompt repeated once per DATA group, and every row must match the reference:

    python -m experiments.reference_check [--fixture_dir DIR[,DIR...]] [--checkpoint DIR]
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m experiments.reference_check --mesh=2,4
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from absl import flags

from experiments.common import DEFAULT_FIXTURE, quiet_jax_logs
from huginn_jax import cli, sharding
from huginn_jax.config import HuginnConfig
from huginn_jax.pretrained import load_model
from huginn_jax.model import forward
from samplers import generate

MAX_NEW_TOKENS = 24  # the fixture's generate cases all use max_new_tokens=24 and init_scale=0
CACHE_FIXTURE = DEFAULT_FIXTURE.parent / "huginn-reference-cache"
"""The same tiny model's generations under every KV-cache strategy, with the cache's memory."""

FLAGS = flags.FLAGS
flags.DEFINE_list("fixture_dir", [str(DEFAULT_FIXTURE), str(CACHE_FIXTURE)],
                  "Folders with checkpoint/, arrays.npz and cases.json, checked one after another.")
flags.DEFINE_string("checkpoint", None, "Parameters to check instead of the fixture's checkpoint/: a Hugging "
                    "Face folder or a converted (python -m convert) checkpoint, read as float32.")
flags.DEFINE_float("rtol", 1e-5, "Largest allowed relative error of forward logits and latents.")
flags.DEFINE_string("mesh", "", "DATA,MODEL: run every case on a mesh of DATA x MODEL devices (e.g. 2,4), each "
                    "prompt repeated DATA times; empty: one device.")


@dataclasses.dataclass(frozen=True)
class Fixture:
    config: HuginnConfig
    params: dict
    arrays: Any  # an NpzFile
    cases: list[dict]


@dataclasses.dataclass(frozen=True)
class CaseResult:
    name: str
    passed: bool
    detail: str


def load_fixture(fixture_dir: str | os.PathLike[str] = DEFAULT_FIXTURE,
                 checkpoint: str | os.PathLike[str] | None = None) -> Fixture:
    """The fixture's cases and arrays, with the parameters of `checkpoint` (default: its own)."""
    fixture_dir = Path(fixture_dir)
    checkpoint = checkpoint or fixture_dir / "checkpoint"
    config, params = load_model(checkpoint, jnp.float32)
    with open(fixture_dir / "cases.json", encoding="utf-8") as f:
        cases = json.load(f)["cases"]
    return Fixture(config, params, np.load(fixture_dir / "arrays.npz"), cases)


def case_name(case: dict) -> str:
    return case.get("name") or f"forward_{case['input_ids'].removesuffix('_input_ids')}"


def relative_error(ours: Any, reference: np.ndarray) -> float:
    return float(np.abs(np.asarray(ours, np.float64) - reference).max() / np.abs(reference).max())


def repeats(mesh: Any) -> int:
    """Copies of each prompt: one per group of rows of the mesh (1 without a mesh)."""
    return 1 if mesh is None else sharding.axis_size(mesh, sharding.default_rules(mesh), "batch")


def tiled(array: np.ndarray, mesh: Any) -> np.ndarray:
    """The rows of `array` repeated once per group of rows of the mesh."""
    return np.concatenate([np.asarray(array)] * repeats(mesh))


def run_forward_case(fixture: Fixture, case: dict, rtol: float, mesh: Any = None) -> CaseResult:
    ids = tiled(fixture.arrays[case["input_ids"]], mesh)
    prefix = case["input_ids"].removesuffix("_input_ids")
    errors = {}
    for steps in case["steps"]:
        out = forward(fixture.params, ids, steps, config=fixture.config, init_scale=case["init_scale"], mesh=mesh)
        errors[f"logits@{steps}"] = relative_error(out.logits, tiled(fixture.arrays[f"{prefix}_steps{steps}_logits"],
                                                                     mesh))
        errors[f"latents@{steps}"] = relative_error(out.latents, tiled(
            fixture.arrays[f"{prefix}_steps{steps}_latents"], mesh))
    from_state = case.get("from_state")
    if from_state:
        states = jnp.asarray(tiled(fixture.arrays[from_state["input_states"]], mesh))
        out = forward(fixture.params, ids, from_state["steps"], config=fixture.config, input_states=states, mesh=mesh)
        key = f"{prefix}_from_state_steps{from_state['steps']}_logits"
        errors[f"from_state@{from_state['steps']}"] = relative_error(out.logits, tiled(fixture.arrays[key], mesh))
    worst = max(errors, key=errors.get)
    return CaseResult(case_name(case), errors[worst] <= rtol,
                      f"{len(errors)} arrays, largest relative error {errors[worst]:.2e} ({worst}), rtol {rtol:.0e}")


def run_generate_case(fixture: Fixture, case: dict, mesh: Any = None) -> CaseResult:
    name = case_name(case)
    prompt = tiled(fixture.arrays[case["prompt"]], mesh)
    try:
        out = generate(fixture.params, prompt, config=fixture.config, max_new_tokens=MAX_NEW_TOKENS,
                       init_scale=0.0, **case["options"], **({} if mesh is None else {"mesh": mesh}))
    except TypeError as err:
        return CaseResult(name, False, f"unsupported: {err}")
    rows = out.sequences()
    if any(row != rows[0] for row in rows) or any(
            not same_rows(value) for value in out.stats.values()):
        return CaseResult(name, False, f"the {len(rows)} copies of the prompt differ: {rows}")
    # Samplers may freeze or accept past max_new_tokens (the fixture records all of it): compare
    # the tokens that every sampler must produce.
    got, want = out.sequences()[0], case["new_tokens"]
    compared = min(len(want), MAX_NEW_TOKENS)
    if got[:compared] != want[:compared]:
        return CaseResult(name, False, f"tokens differ: got {got}, want {want}")
    checked = f"{compared} tokens"
    if "cache_memory_mb" in case:
        memory = out.stats.get("cache_memory_mb")
        if memory is None:
            return CaseResult(name, False, "tokens identical; unsupported: this sampler reports no cache_memory_mb")
        if float(memory[0]) != case["cache_memory_mb"]:
            return CaseResult(name, False, f"tokens identical, cache memory differs: got {float(memory[0])} MiB, "
                                           f"want {case['cache_memory_mb']} MiB")
        checked += f" and cache memory ({case['cache_memory_mb']} MiB)"
    if "stats" in case:
        stats = getattr(out, "stats", None)
        if not stats:
            return CaseResult(name, False, "unsupported: this sampler reports no statistics")
        differ = [key for key, want in case["stats"].items() if not same_statistic(stats.get(key), want)]
        if differ:
            details = "; ".join(f"{key}: got {first_row(stats.get(key))}, want {case['stats'][key]}" for key in differ)
            return CaseResult(name, False, f"tokens identical, statistics differ: {details}")
        return CaseResult(name, True, f"{checked} and {len(case['stats'])} statistics identical")
    return CaseResult(name, True, f"{checked} identical")


def same_rows(value: Any) -> bool:
    """Whether every row of a per-sequence statistic is the first row."""
    rows = [row.tolist() if hasattr(row, "tolist") else row for row in value]
    return all(row == rows[0] for row in rows)


def first_row(value: Any) -> Any:
    """The first sequence's entry of a per-sequence statistic, as plain Python."""
    if value is None:
        return None
    row = value[0]
    return row.tolist() if hasattr(row, "tolist") else row


def same_statistic(ours: Any, want: Any) -> bool:
    """The fixture stores per-position statistics as [[...]] (batch of one), scalars as numbers."""
    if ours is None:
        return False
    return first_row(ours) == (want[0] if isinstance(want, list) else want)


def run_case(fixture: Fixture, case: dict, rtol: float = 1e-5, mesh: Any = None) -> CaseResult:
    """One case's result; a case that raises fails with the error instead of ending the run.
    On a `mesh`, the fixture's parameters should already be placed (`sharding.shard_params`)."""
    try:
        if case["kind"] == "forward":
            return run_forward_case(fixture, case, rtol, mesh)
        if case["kind"] == "generate":
            return run_generate_case(fixture, case, mesh)
    except Exception as err:  # noqa: BLE001 - a case that cannot run is a failure, never the end of the run
        return CaseResult(case_name(case), False, f"cannot run: {type(err).__name__}: {err}")
    return CaseResult(case_name(case), False, f"unknown case kind {case['kind']!r}")


def main(argv: list[str]) -> None:
    quiet_jax_logs()
    try:
        shape = sharding.parse_mesh(FLAGS.mesh)
        mesh = None if shape is None else sharding.make_mesh(shape)
    except ValueError as err:
        raise cli.UsageError(str(err)) from None
    for folder in FLAGS.fixture_dir:
        missing = [part for part in ("checkpoint", "arrays.npz", "cases.json") if not (Path(folder) / part).exists()]
        if missing:
            raise cli.UsageError(f"--fixture_dir={folder} is not a reference fixture: it has no {', '.join(missing)}")
    results = []
    for folder in FLAGS.fixture_dir:
        fixture = load_fixture(folder, FLAGS.checkpoint)
        where = ""
        if mesh is not None:  # placed once, heads padded as far as the mesh needs
            config, params = sharding.shard_params(fixture.params, fixture.config, mesh)
            fixture = dataclasses.replace(fixture, config=config, params=params)
            where = (f" on a mesh of data {shape[0]} x model {shape[1]} devices ({config.stored_heads} heads stored, "
                     f"{config.n_heads} real), each prompt {repeats(mesh)} times")
        print(f"fixture {folder}: {len(fixture.cases)} cases{where}", flush=True)
        for case in fixture.cases:
            result = run_case(fixture, case, FLAGS.rtol, mesh)
            results.append(result)
            print(f"{'PASS' if result.passed else 'FAIL'}  {result.name:<42} {result.detail}", flush=True)
    passed = sum(r.passed for r in results)
    print(f"reference_check: {passed}/{len(results)} cases pass")
    sys.exit(0 if passed == len(results) else 1)


if __name__ == "__main__":
    cli.run(main)
