"""experiments.tpu_plan: every sampler of the tiny model compiled for a TPU v5e slice with libtpu's
compile-only devices (no TPU needed; libtpu comes with the test extra, about 700 MB), so that a
sharding mistake in the model or a sampler fails the build; the plan's memory, times and refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec

from huginn_jax import roofline, sharding
from huginn_jax.config import HUGINN_0125, TINY
from samplers import plan

pytestmark = pytest.mark.libtpu

REPO = Path(__file__).resolve().parents[1]
# Few programs, each compiled once: the narrowest diffusion window (8 positions) for the fixed
# freeze at r=8, r'=4 and the paper rate's wavefront, 4 positions for the timed wavefront and the
# speculative lookahead; one attention view (context <= 128).
TINY_PLAN = ["--profile=tiny", "--prompt_tokens=4", "--context=64", "--max_wavefront=16", "--num_steps=8",
             "--wavefronts=4", "--diffusion_wavefront=4"]


def run_plan(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "experiments.tpu_plan", *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=900)


def test_every_sampler_compiles_for_a_v5e_slice_with_rows_and_heads_split(tmp_path):
    out = tmp_path / "plan.json"
    run = run_plan("--topology=v5e:2x2", "--mesh=2,2", "--batch=2", *TINY_PLAN, f"--output={out}")
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert (result["devices"], result["device_kind"], result["mesh"]) == (4, "TPU v5 lite", {"data": 2, "model": 2})
    names = [p["name"] for p in result["programs"]]
    assert names == ["block x4", "core step x4", "block x1", "core step x1", "block x4 (all decoded)",
                     "block x8 (all decoded)", "core step x8", "sampler: static AR loop", "sampler: adaptive AR loop",
                     "sampler: speculative rounds",
                     "sampler: diffusion start", "sampler: diffusion phase (window 16)"]
    hbm = roofline.CHIPS["v5e"].hbm_bytes
    for program in result["programs"]:
        assert 0 < program["per_chip_bytes"] < hbm, program
    for program in result["programs"][:5]:
        assert program["seconds"] > 0, program
    steps = {(r["step"], r["batch"]) for r in result["projections"]}
    assert len(steps) == 7 and {r["batch"] for r in result["projections"]} == {2}
    for row in result["projections"]:  # the compiler's time cannot beat the slice's roofline
        assert 0 < row["tokens_per_s"] <= row["roofline_tokens_per_s"], row
    assert "| sampler step | batch |" in run.stdout and "TPU v5 lite" in run.stdout

    # the plans of several slices side by side: this one's row, read back from its JSON
    (row,) = plan.summary_rows(result)
    projected = {r["step"].split(" (")[0]: r["tokens_per_s"] for r in result["projections"]}
    assert row["tokens_per_s"]["static AR"] == projected["static AR r=8"]
    assert row["diffusion_vs_ar"] == projected["diffusion, paper-main"] / projected["static AR r=8"]
    assert row["most_bytes_per_chip"] == max(p["per_chip_bytes"] for p in result["programs"][:7])
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    summary = subprocess.run([sys.executable, "-m", "experiments.tpu_plan_summary", f"--plans={tmp_path}"],
                             capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert summary.returncode == 0, summary.stderr[-3000:]
    assert [line.split(" | ")[:3] for line in summary.stdout.splitlines()[2:]] == [["| v5e:2x2", "2x2", "2"]]
    empty = subprocess.run([sys.executable, "-m", "experiments.tpu_plan_summary", f"--plans={tmp_path / 'none'}"],
                           capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert empty.returncode == 2 and "--plans=" in empty.stderr and "Traceback" not in empty.stderr, empty.stderr


def test_the_model_axis_splits_the_weights():
    """The core step's arguments per chip on a model axis of 4 against one chip: the core's weights
    and the cache's heads split four ways (norms and the adapter replicated), and what that costs in
    bytes moved between chips."""
    settings = plan.PlanSettings(TINY, jnp.bfloat16, prompt_tokens=4, context=64, max_wavefront=16, num_steps=8,
                                 wavefronts=(4,), batches=(1,))
    split = plan.Placement.create(TINY, jnp.bfloat16, plan.plan_mesh(plan.tpu_devices("v5e:2x2"), (1, 4)))
    whole = plan.Placement.create(TINY, jnp.bfloat16, plan.plan_mesh(plan.tpu_devices("v5e:1x1"), (1, 1)))
    programs = [plan.compile_step(settings, place, "core", 1, 1, 1) for place in (split, whole)]
    assert programs[0].argument_bytes < 0.35 * programs[1].argument_bytes
    # only the split model moves bytes between chips: the attention output and the MLP's down
    # projection end in partial sums over the model axis, at least one all-reduce of a (1, 1, 64)
    # bfloat16 residual per block
    moved = [p.collective_bytes for p in programs]
    assert moved[0]["all-reduce"] >= TINY.n_layers_in_recurrent_block * 64 * 2, moved[0]
    assert not any(moved[1].values()), moved[1]


def test_huginn_0125_heads_are_padded_to_split_over_the_model_axis():
    place = plan.Placement.create(HUGINN_0125, jnp.bfloat16, plan.plan_mesh(plan.tpu_devices("v5e:2x4"), (1, 8)))
    assert place.config.kv_head_padding == 1 and place.config.stored_heads == 56
    wqkv = place.params["core"][0]["wqkv"]
    assert wqkv.shape == (5280, 56, 3, 96)
    assert wqkv.sharding.spec == PartitionSpec(None, sharding.MODEL, None, None)
    assert place.params["wte"].sharding.spec == PartitionSpec(sharding.MODEL, None)


def test_a_plan_that_does_not_fit_is_refused_with_what_to_change():
    # tiny's shared cache holds 8 slots x 4 heads x 16 x 2 (keys, values) x 2 bytes = 2 KiB per position and
    # row: 256 positions of 65536 rows are 32 GiB, twice a v5e's HBM
    run = run_plan("--topology=v5e:1x1", "--profile=tiny", "--batch=65536", "--prompt_tokens=4", "--context=256",
                   "--samplers=")
    assert run.returncode == 1, run.stderr[-3000:]
    error = [line for line in run.stderr.splitlines() if "experiments.tpu_plan: error:" in line]
    assert len(error) == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
    # the TPU compiler itself refuses a program that needs more than the chip's HBM
    assert "the plan does not fit: block x4 at batch 65536: the TPU compiler refuses it (Ran out of memory" in error[0]
    assert all(flag in error[0] for flag in ("--batch", "--context", "--mesh")), error[0]


def test_bad_slices_and_meshes_are_usage_errors():
    for args, text in [(["--topology=v9z:2x2"], "libtpu does not know the TPU slice --topology='v9z:2x2'"),
                       (["--topology=v5e"], "is not a TPU slice name"),
                       (["--topology=v5e:2x2", "--mesh=2,4"], "--mesh=2,4 has 8 devices but the slice has 4")]:
        run = run_plan(*args, *TINY_PLAN)
        assert run.returncode == 2, run.stderr[-3000:]
        error = [line for line in run.stderr.splitlines() if "experiments.tpu_plan: error:" in line]
        assert len(error) == 1 and text in error[0] and "Traceback" not in run.stderr, run.stderr[-3000:]


def test_collective_bytes_sum_each_collectives_result_per_chip():
    hlo = "\n".join([
        "  %all-reduce.1 = bf16[2,4,64]{2,1,0} all-reduce(bf16[2,4,64]{2,1,0} %fusion.3), replica_groups={{0,1}}",
        "  %ags = (f32[3,5]{1,0}, s32[7]{0}) all-gather-start(f32[3,5]{1,0} %p), dimensions={0}",
        "  %agd = f32[3,5]{1,0} all-gather-done((f32[3,5]{1,0}, s32[7]{0}) %ags)",
        "  %add.2 = f32[3,5]{1,0} add(f32[3,5]{1,0} %agd, f32[3,5]{1,0} %agd)",
        "  %cp = pred[] collective-permute(pred[] %flag), source_target_pairs={{0,1}}",
    ])
    moved = plan.collective_bytes(hlo)
    assert moved == {"all-reduce": 2 * 4 * 64 * 2, "all-gather": 3 * 5 * 4 + 7 * 4, "all-to-all": 0,
                     "reduce-scatter": 0, "collective-permute": 1}


def test_head_padding_compares_the_layouts_for_a_tpu_slice():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    run = subprocess.run([sys.executable, "-m", "experiments.head_padding", "--profile=tiny", "--topology=v5e:2x2",
                          "--layouts=padded,head_dim", "--context=64", "--block=16", "--dtype=bfloat16"],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in run.stdout.splitlines() if line.startswith("| padded")
            or line.startswith("| head_dim")]
    assert [(r[0].strip(), r[2].split("(")[0].strip()) for r in rows] == [
        ("padded", "decode"), ("padded", "prefill"), ("head_dim", "decode"), ("head_dim", "prefill")]
    for row in rows:
        assert row[-1].strip().endswith(" ms") and float(row[-1].split()[0]) > 0, row  # the compiler's time
    # splitting inside a head gathers what splitting whole heads never moves
    assert all("all-gather" not in r[7] for r in rows[:2]) and all("all-gather" in r[7] for r in rows[2:]), rows
