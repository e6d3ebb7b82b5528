"""Fault injection: `python -m convert` stopped by SIGINT or SIGTERM at several points of a
multi-shard conversion leaves nothing of the attempt behind, and an existing output untouched.

The converter runs as a real subprocess on a synthetic checkpoint of about 35 MB in three shards.
To hit a point exactly, a small launcher pauses the run once a given number of tensors is done
(it wraps `convert.progress.Progress.update`, which the converter calls after each tensor) and
waits for the test to deliver the signal and say "go"; the "as soon as the temporary folder
appears" point is not paused, the signal races the converter as a user's would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from convert import import_checkpoint
from convert.exporter import rope_buffer
from huginn_jax.config import HuginnConfig
from huginn_jax.hf_layout import ROPE_BUFFER, hf_shapes
from tests.test_bad_inputs import REPO, tree_digest
from tests.test_params_and_loading import write_checkpoint

WIDE = {"n_embd": 256, "head_dim": 64, "n_heads": 4, "num_key_value_heads": 4, "intermediate_size": 1024,
        "vocab_size": 16384, "padded_vocab_size": 16384, "n_layers_in_prelude": 1, "n_layers_in_recurrent_block": 2,
        "n_layers_in_coda": 1, "n_layers": 4}
TIMEOUT = 60.0

LAUNCHER = """
import os, runpy, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, whatever the test runner inherited
gate = int(os.environ.get("GATE_AT", "0"))
if gate:
    import convert.progress
    update = convert.progress.Progress.update
    def paused_update(self, nbytes, tensors=1):
        update(self, nbytes, tensors)
        if self.tensors >= gate and not os.path.exists(os.environ["GATE_REACHED"]):
            open(os.environ["GATE_REACHED"], "w").close()
            while not os.path.exists(os.environ["GATE_GO"]):
                time.sleep(0.002)
    convert.progress.Progress.update = paused_update
sys.argv = ["convert", *sys.argv[1:]]
runpy.run_module("convert", run_name="__main__", alter_sys=True)
"""


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """(a three-shard Hugging Face checkpoint of about 35 MB, the same converted, number of tensors)."""
    root = tmp_path_factory.mktemp("faults")
    with open(os.path.join(REPO, "tests/fixtures/huginn-reference-tiny/checkpoint/config.json")) as f:
        hf = {k: v for k, v in json.load(f).items() if k not in ("effective_expected_depth", "init_values")}
    hf.update(WIDE)  # the fields derived from the width are left out, not restated
    config = HuginnConfig.from_hf_dict(hf)
    rng = np.random.default_rng(0)
    tensors = {k: (rng.standard_normal(shape, dtype=np.float32) * 0.02) for k, shape in hf_shapes(config).items()}
    tensors[ROPE_BUFFER] = rope_buffer(config)
    assert sum(t.nbytes for t in tensors.values()) > 30e6
    hf_dir = write_checkpoint(root / "hf", tensors, shards=3)
    (hf_dir / "config.json").write_text(json.dumps(hf))
    converted = root / "converted"
    import_checkpoint(str(hf_dir), converted, progress=False)
    return hf_dir, converted, len(tensors)


def existing_output(folder):
    """A previous output that --overwrite would replace."""
    folder.mkdir()
    (folder / "keep.txt").write_text("the previous output")
    (folder / "sub").mkdir()
    (folder / "sub" / "data.bin").write_bytes(bytes(range(256)) * 64)


def run_and_interrupt(tmp_path, args, signum, gate_at):
    """Runs the converter; sends `signum` once `gate_at` tensors are done (0: as soon as the
    temporary folder appears). Returns (exit status, stderr)."""
    output = tmp_path / "out" / "model"
    reached, go = tmp_path / "reached", tmp_path / "go"
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", GATE_AT=str(gate_at), GATE_REACHED=str(reached),
               GATE_GO=str(go))
    with open(tmp_path / "stderr.txt", "w") as err:
        child = subprocess.Popen([sys.executable, "-c", LAUNCHER, *args, f"--output={output}", "--noprogress"],
                                 cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.monotonic() + TIMEOUT
            while not (reached.exists() if gate_at else
                       any(p.name.startswith(".model.incomplete-") for p in output.parent.iterdir())):
                assert child.poll() is None, (tmp_path / "stderr.txt").read_text()[-3000:]
                assert time.monotonic() < deadline, "the converter never reached the point"
                time.sleep(0.002)
            child.send_signal(signum)
            go.touch()
            status = child.wait(timeout=TIMEOUT)
        finally:
            if child.poll() is None:
                child.kill()
    return status, (tmp_path / "stderr.txt").read_text()


# (command, signal, when: tensors done, 0 = as soon as the temporary folder appears, "last" = all
# tensors done (import: params written, buffers next; export: the last shard written), existing output)
CASES = [
    ("import", signal.SIGINT, 0, False),
    ("import", signal.SIGTERM, 0, True),
    ("import", signal.SIGTERM, "half", False),
    ("import", signal.SIGINT, "half", True),
    ("import", signal.SIGINT, "last", False),
    ("import", signal.SIGTERM, "last", True),
    ("export", signal.SIGTERM, 0, False),
    ("export", signal.SIGINT, "half", True),
    ("export", signal.SIGTERM, "last", True),
]


@pytest.mark.parametrize("command,signum,when,overwrite", CASES,
                         ids=[f"{c}-{signal.Signals(s).name}-{w}-{'overwrite' if o else 'fresh'}"
                              for c, s, w, o in CASES])
def test_interrupted_conversion_leaves_nothing_and_keeps_the_existing_output(sources, tmp_path, command, signum,
                                                                             when, overwrite):
    hf_dir, converted, n_tensors = sources
    (tmp_path / "out").mkdir()
    if overwrite:
        existing_output(tmp_path / "out" / "model")
    before = tree_digest(tmp_path / "out")
    source_before = tree_digest(hf_dir if command == "import" else converted)
    args = [command, f"--source={hf_dir if command == 'import' else converted}", "--max_shard_size=4MB"]
    args += ["--overwrite"] if overwrite else []
    gate_at = {0: 0, "half": n_tensors // 2, "last": n_tensors}[when]
    status, stderr = run_and_interrupt(tmp_path, args, signum, gate_at)
    assert tree_digest(tmp_path / "out") == before, stderr[-3000:]  # nothing added, the existing output intact
    assert tree_digest(hf_dir if command == "import" else converted) == source_before
    assert status == 128 + signum, stderr[-3000:]
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (f"convert {command}: interrupted by {signal.Signals(signum).name}; "
                                               "nothing of this run is left at --output")
