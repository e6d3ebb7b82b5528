"""experiments.gpu_suite on CPU with the tiny profile: every random-weight run and the embedded
model's table are measured in one process, written as JSON and markdown, and each run's roofline
numbers are consistent with the analytic model (a CPU is far slower than an H100's roofline, so
every fraction lies in (0, 1))."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from experiments.gpu_suite import RUN_KEYS

REPO = Path(__file__).resolve().parents[1]


def test_the_gpu_suite_runs_on_cpu_with_the_tiny_profile(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    # the runs the assertions compare (each run compiles its own programs: all of RUN_KEYS take minutes)
    wanted = ["ar-full", "ar-shared", "diffusion-fixed-b8", "diffusion-fixed-b32"]
    assert set(wanted) < set(RUN_KEYS)
    run = subprocess.run([sys.executable, "-m", "experiments.gpu_suite", "--profile=tiny", "--repeats=1",
                          f"--runs={','.join(wanted)}", "--table_problems=1", "--table=ar", "--chip=H100",
                          f"--output_dir={tmp_path}"], capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert (tmp_path / "gpu_suite.md").read_text() in run.stdout
    runs = {r["run"]: r for r in result["runs"]}
    assert list(runs) == wanted
    new, steps = result["new_tokens"], result["num_steps"]
    for key, r in runs.items():
        assert "skipped" not in r, r
        # no stop tokens: every row generates every token (diffusion may freeze a few past the end)
        assert r["tokens"] >= r["batch"] * new, r
        assert r["tokens_per_s"] > 0 and r["weight_bytes"] > 0 and r["cache_bytes"] > 0, r
        assert 0 < r["hbm_fraction"] < 1 and 0 < r["roofline_fraction"] < 1, r
    for key in ("ar-full", "ar-shared"):
        assert runs[key]["mean_recurrence"] == steps
    # the same passes read the same bytes whichever cache holds them
    assert runs["ar-full"]["bytes"] == runs["ar-shared"]["bytes"]
    # a batch of 32 reads the weights about as often as a batch of 8, and 4x the cache
    b8, b32 = runs["diffusion-fixed-b8"], runs["diffusion-fixed-b32"]
    assert b32["cache_bytes"] > 3 * b8["cache_bytes"] and b32["weight_bytes"] < 2 * b8["weight_bytes"]
    assert [t["row"] for t in result["embedded_table"]] == ["ar"]
    for t in result["embedded_table"]:
        assert 0 <= t["accuracy"] <= 1 and 0 < t["hbm_fraction"] < 1, t
