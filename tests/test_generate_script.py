"""The main job of the README, `python -m experiments.generate`: the embedded trained model by
default, any checkpoint with --prompt_ids."""

import json
import re
import subprocess
import sys

import jax

from experiments.common import load_task_model
from huginn_jax.tasks.arithmetic import EMBEDDED_MODEL, demo_problem
from samplers import generate_minimal
from tests.conftest import CHECKPOINT_DIR


def run_generate(*flags: str) -> list[str]:
    run = subprocess.run([sys.executable, "-m", "experiments.generate", "--repeats=1", *flags],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout.splitlines()


def test_main_job_answers_a_held_out_problem_with_both_samplers():
    lines = run_generate()
    problem = demo_problem()
    assert any(f"{problem.a} + {problem.b}" in line for line in lines)
    answers = [re.search(r"'(\d+)' = (\d+): (\w+)", line) for line in lines]
    answers = [a for a in answers if a]
    assert len(answers) == 2  # static AR and diffusion
    config, params, tokenizer = load_task_model(EMBEDDED_MODEL)
    want = generate_minimal(params, [tokenizer.encode_prompt(problem)], config=config, max_new_tokens=10,
                            num_steps=32, stop_token_ids=[tokenizer.end_id], key=jax.random.key(0))
    assert answers[0].group(1) + "<|end_text|>" == tokenizer.decode(want.sequences()[0])
    for answer in answers:  # the embedded model gets this one right, with either sampler
        assert int(answer.group(2)) == problem.a + problem.b and answer.group(3) == "correct"
    assert sum("tokens/s" in line for line in lines) == 2


def test_any_checkpoint_with_prompt_ids(reference):
    prompt = [148, 63, 149, 65, 196]
    lines = run_generate(f"--checkpoint={CHECKPOINT_DIR}", f"--prompt_ids={','.join(map(str, prompt))}",
                         "--max_new_tokens=6", "--init_scale=0", "--num_steps=8", "--sampler=ar")
    assert json.loads(next(line for line in lines if line.startswith("prompt ids:")).split(":", 1)[1]) == prompt
    want = generate_minimal(reference.params, [prompt], config=reference.config, max_new_tokens=6, num_steps=8,
                            init_scale=0.0)
    assert f"ar: {want.sequences()[0]}" in lines
    assert any(line.startswith("6 tokens in ") and "8.0 sequential core steps per token" in line for line in lines)
