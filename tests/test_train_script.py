"""`python -m experiments.train` end to end: data parallel over two (simulated) devices, Orbax
checkpoints, exact resume, refusal to resume a different run, and a model that loads and decodes."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np

from experiments.common import load_task_model
from samplers import generate_minimal

TINY_RUN = ["--n_embd=32", "--n_heads=2", "--intermediate_size=48", "--mean_recurrence=4", "--mean_backprop_depth=2",
            "--batch_size=8", "--steps=4", "--warmup_steps=2", "--log_every=1", "--eval_every=2",
            "--checkpoint_every=2"]


def train(output_dir, *extra):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "experiments.train", f"--output_dir={output_dir}", *TINY_RUN, *extra],
                          capture_output=True, text=True, timeout=600, env=env)


def test_training_resumes_exactly_and_writes_a_usable_model(tmp_path):
    run = train(tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 devices" in run.stderr
    config, params, tokenizer = load_task_model(tmp_path / "model")
    assert config.n_embd == 32 and config.mean_recurrence == 4
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) for r in records)
    assert "heldout_exact" in records[1] and "heldout_exact" in records[3]

    # lose the last checkpoint and the model: a rerun resumes from step 2 and ends where the first did
    shutil.rmtree(tmp_path / "checkpoints" / "4")
    shutil.move(tmp_path / "model", tmp_path / "first_model")
    again = train(tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming" in again.stderr and "from step 2" in again.stderr
    _, resumed, _ = load_task_model(tmp_path / "model")
    _, first, _ = load_task_model(tmp_path / "first_model")
    jax.tree.map(np.testing.assert_array_equal, resumed, first)
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]

    # the trained model decodes through the samplers with its own tokenizer's stop token
    out = generate_minimal(params, [[tokenizer.begin_id, 5, 14, 6, 15]], config=config, max_new_tokens=3,
                           stop_token_ids=[tokenizer.end_id], init_scale=0.0)
    assert out.tokens.shape == (1, 3)

    # a different run in the same folder is refused, naming the changed flag
    other = train(tmp_path, "--learning_rate=0.1")
    assert other.returncode != 0 and "learning_rate" in other.stderr and "different run" in other.stderr
