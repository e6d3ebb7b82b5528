"""A multi-host run on one machine: two processes on 127.0.0.1 with 4 simulated CPU devices each
(`jax.distributed.initialize`), each sampling its share of the prompts on a (2, 2) mesh of its
own devices, give exactly what one process gives for all the prompts; only process 0 prints and
writes. Plus the refusals of --distributed."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from huginn_jax.tasks import arithmetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu", PYTHONPATH=REPO)


def generate_command(prompts_file, output, *flags: str) -> list[str]:
    return [sys.executable, "-m", "experiments.generate", f"--checkpoint={arithmetic.EMBEDDED_MODEL}",
            f"--prompt_ids_file={prompts_file}", f"--output={output}", "--max_new_tokens=5", "--num_steps=6",
            "--do_sample", "--temperature=1.5", "--top_k=0", "--mesh=2,2", *flags]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_give_the_results_of_one(tmp_path):
    tokenizer = arithmetic.TaskTokenizer.from_file(arithmetic.EMBEDDED_MODEL / "tokenizer.json")
    prompts = [tokenizer.encode_prompt(p) for p in arithmetic.heldout_problems()[:8]]  # 6 to 16 ids
    prompts_file = tmp_path / "ids.txt"
    prompts_file.write_text("".join(",".join(map(str, p)) + "\n" for p in prompts))
    port = free_port()
    # the processes write to files, not pipes: a full pipe that nobody reads yet would stall a process
    # while the other waits for it at the end of the run
    logs = [(open(tmp_path / f"out{i}", "w+"), open(tmp_path / f"err{i}", "w+")) for i in range(2)]
    children = [subprocess.Popen(generate_command(prompts_file, tmp_path / f"multi{i}.jsonl", "--distributed",
                                                  f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                                                  f"--process_id={i}"),
                                 stdout=out, stderr=err, text=True, env=ENV, cwd=REPO)
                for i, (out, err) in enumerate(logs)]
    single = subprocess.run(generate_command(prompts_file, tmp_path / "single.jsonl"), capture_output=True, text=True,
                            env=ENV, cwd=REPO, timeout=600)
    for child in children:
        child.wait(timeout=600)
    outputs = []
    for out, err in logs:
        out.seek(0), err.seek(0)
        outputs.append((out.read(), err.read()))
        out.close(), err.close()
    assert single.returncode == 0, single.stderr[-3000:]
    for child, (_, err) in zip(children, outputs):
        assert child.returncode == 0, err[-3000:]
    want = [json.loads(line) for line in (tmp_path / "single.jsonl").read_text().splitlines()]
    got = [json.loads(line) for line in (tmp_path / "multi0.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in got] == prompts
    assert got == want
    assert len({tuple(r["generated_ids"]) for r in got}) > 1  # sampled, and not all alike
    assert not (tmp_path / "multi1.jsonl").exists()  # only process 0 writes
    assert outputs[1][0] == ""  # ... and prints
    lines = outputs[0][0].splitlines()
    assert lines[:-1] == single.stdout.splitlines()[:-1] and lines[-1].endswith(", 2 processes")


def test_distributed_refusals_say_what_to_change(tmp_path):
    prompts_file = tmp_path / "ids.txt"
    prompts_file.write_text("1,2,3\n")
    cases = [
        (["--distributed"], "--distributed found no coordinator: pass --coordinator_address=HOST:PORT"),
        (["--distributed", "--coordinator_address=127.0.0.1:1"], "--coordinator_address needs --num_processes and "
                                                                 "--process_id too"),
        (["--coordinator_address=127.0.0.1:1"], "--coordinator_address, --num_processes and --process_id need "
                                                "--distributed"),
        (["--mesh=4,2"], "a mesh of 4 x 2 needs 8 devices, but 4 are available"),
    ]
    for flags, message in cases:
        run = subprocess.run(generate_command(prompts_file, tmp_path / "o.jsonl", *flags), capture_output=True,
                             text=True, env=ENV, cwd=REPO, timeout=300)
        assert run.returncode == 2, (flags, run.stderr[-2000:])
        assert message in run.stderr and "Traceback" not in run.stderr, (flags, run.stderr[-2000:])
        assert len(run.stderr.strip().splitlines()) <= 2, run.stderr
    run = subprocess.run([sys.executable, "-m", "experiments.generate", "--distributed", "--prompt_ids=1,2"],
                         capture_output=True, text=True, env=ENV, cwd=REPO, timeout=300)
    assert run.returncode == 2 and "--distributed splits a batch of prompts across processes" in run.stderr
