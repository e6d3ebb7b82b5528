"""The main job of the README, `python -m experiments.generate`, on the embedded tiny model."""

import json
import subprocess
import sys

from samplers import generate_minimal


def test_main_job_streams_the_greedy_tokens_and_reports_speed(reference):
    run = subprocess.run([sys.executable, "-m", "experiments.generate", "--max_new_tokens=6", "--init_scale=0"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    prompt = json.loads(next(line for line in lines if line.startswith("prompt:")).removeprefix("prompt:"))
    streamed = [int(t) for t in next(line for line in lines if line.startswith("generated:")).split()[1:]]
    want = generate_minimal(reference.params, [prompt], config=reference.config, max_new_tokens=6, init_scale=0.0)
    assert streamed == want.sequences()[0]
    assert "tokens/s" in lines[-1]
