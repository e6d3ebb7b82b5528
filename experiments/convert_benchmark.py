"""Times `python -m convert` on a synthetic checkpoint with the exact layout of a released model.

Writes a bfloat16 checkpoint with the key names and shapes of the chosen preset (Huginn-0125 by
default: 3.5B parameters plus the stored copy of the tied `lm_head.weight` and `freqs_cis`, in two
safetensors shards with an index) filled with random finite values, then runs the import (and,
unless --noexport, the export back) as child processes and reports, as JSON, each one's wall time
and peak resident memory (`ru_maxrss` of the child, measured by a small launcher) against the targets: peak memory
at most 1.5x the checkpoint size, under 5 minutes.

    python -m experiments.convert_benchmark --config=cpu             # seconds
    python -m experiments.convert_benchmark --workdir=/work/bench_convert   # Huginn-0125, ~15 GB disk
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from absl import app, flags

from convert.exporter import PlannedTensor, rope_buffer, split
from convert.safetensors_io import StreamingWriter
from huginn_jax.config import PRESETS, HuginnConfig, preset
from huginn_jax.hf_layout import LM_HEAD, ROPE_BUFFER, hf_shapes
from huginn_jax.loading import INDEX_FILE
from huginn_jax.params import count_params

FLAGS = flags.FLAGS
flags.DEFINE_enum("config", "huginn-0125", sorted(PRESETS), "Model shape of the synthetic checkpoint.")
flags.DEFINE_string("workdir", "/tmp/convert_benchmark", "Scratch folder (removed afterwards unless --keep).")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Dtype the import stores.")
flags.DEFINE_bool("export", True, "Also time the export back to the Hugging Face layout.")
flags.DEFINE_bool("keep", False, "Keep the scratch folder.")
flags.DEFINE_integer("seed", 0, "Seed of the random weights.")

MEMORY_TARGET = 1.5  # peak resident memory / checkpoint size
TIME_TARGET_S = 300.0
CHUNK = 1 << 24  # values generated at a time


def random_bf16(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Random finite bfloat16 values of magnitude 2^-16..2 with random signs, made from bits (fast)."""
    size = int(np.prod(shape))
    rng = np.random.default_rng(seed)
    out = np.empty(size, np.uint16)
    for i in range(0, size, CHUNK):
        bits = rng.integers(0, 1 << 16, size=min(CHUNK, size - i), dtype=np.uint16)
        exponent = (111 + (bits >> 7) % 17).astype(np.uint16)  # 2^-16 .. 2^0
        out[i:i + bits.size] = (bits & 0x807F) | (exponent << 7)
    return out.view(ml_dtypes.bfloat16).reshape(shape)


def write_synthetic_checkpoint(folder: Path, config: HuginnConfig, seed: int) -> int:
    """The released layout: config.json, two bfloat16 shards and their index. Returns its bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    hf = config.to_hf_dict() | {"torch_dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(hf, indent=2))
    shapes = dict(hf_shapes(config))
    shapes[LM_HEAD] = shapes["transformer.wte.weight"]  # the released checkpoints store the tied head
    rope = rope_buffer(config)
    plan = [PlannedTensor(k, s, np.dtype(ml_dtypes.bfloat16)) for k, s in shapes.items()]
    plan.append(PlannedTensor(ROPE_BUFFER, rope.shape, rope.dtype))
    total = sum(t.nbytes for t in plan)
    shards = split(plan, (total + 1) // 2)
    assert len(shards) in (2, 3)  # a greedy split at half may spill one tensor into a third part
    if len(shards) == 3:
        shards = [shards[0], shards[1] + shards[2]]
    names = [f"model-{i + 1:05d}-of-00002.safetensors" for i in range(2)]
    weight_map = {}
    for name, shard in zip(names, shards):
        dtypes = {t.key: ("F32" if t.key == ROPE_BUFFER else "BF16") for t in shard}
        with StreamingWriter(folder / name, [(t.key, dtypes[t.key], t.shape) for t in shard],
                             {"format": "pt"}) as writer:
            for t in shard:
                key_seed = "transformer.wte.weight" if t.key == LM_HEAD else t.key  # the tied copy is identical
                value = rope if t.key == ROPE_BUFFER else random_bf16(t.shape, hash_seed(key_seed, seed))
                writer.write(t.key, value)
                weight_map[t.key] = name
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def hash_seed(key: str, seed: int) -> int:
    """A seed per tensor name that does not depend on Python's string hash randomisation."""
    return seed * 1_000_003 + sum((i + 1) * ord(c) for i, c in enumerate(key))


# A fresh, small process that runs the command and reports its ru_maxrss. Measuring a child forked
# from this (large) process directly would not do: Linux carries the parent's peak into a forked
# child's ru_maxrss, even across exec.
LAUNCHER = """
import json, os, subprocess, sys
process = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(process.pid, 0)
json.dump({"exit": os.waitstatus_to_exitcode(status), "maxrss_kib": usage.ru_maxrss}, open(sys.argv[1], "w"))
"""


def run_child(args: list[str], log_dir: Path) -> dict[str, Any]:
    """Wall time and peak resident memory of `python -m convert ...` in a process of its own."""
    out, err, usage = (log_dir / f"{args[0]}.{suffix}" for suffix in ("stdout", "stderr", "usage.json"))
    start = time.perf_counter()
    with open(out, "w") as stdout, open(err, "w") as stderr:
        subprocess.run([sys.executable, "-c", LAUNCHER, str(usage), sys.executable, "-m", "convert", *args,
                        "--noprogress"], cwd=Path(__file__).resolve().parents[1], stdout=stdout, stderr=stderr,
                       check=True)
    wall = time.perf_counter() - start
    measured = json.loads(usage.read_text())
    if measured["exit"]:
        raise RuntimeError(f"python -m convert {' '.join(args)} failed:\n{err.read_text()[-4000:]}")
    return {"wall_s": round(wall, 1), "peak_rss_bytes": measured["maxrss_kib"] * 1024,
            "stdout": out.read_text().strip()}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main(argv: list[str]) -> None:
    del argv
    config = preset(FLAGS.config)
    work = Path(FLAGS.workdir)
    if work.exists():
        shutil.rmtree(work)
    try:
        start = time.perf_counter()
        checkpoint_bytes = write_synthetic_checkpoint(work / "hf", config, FLAGS.seed)
        report: dict[str, Any] = {
            "config": FLAGS.config, "params": count_params(config), "dtype_in": "bfloat16", "dtype_out": FLAGS.dtype,
            "checkpoint_bytes": checkpoint_bytes, "synthesis_s": round(time.perf_counter() - start, 1),
            "targets": {"peak_rss_over_checkpoint": MEMORY_TARGET, "wall_s": TIME_TARGET_S},
        }
        steps = {"import": ["import", f"--source={work / 'hf'}", f"--output={work / 'orbax'}",
                            f"--dtype={FLAGS.dtype}"]}
        if FLAGS.export:
            steps["export"] = ["export", f"--source={work / 'orbax'}", f"--output={work / 'hf_out'}"]
        for name, args in steps.items():
            result = run_child(args, work)
            result["peak_rss_over_checkpoint"] = round(result["peak_rss_bytes"] / checkpoint_bytes, 3)
            result["meets_targets"] = (result["peak_rss_over_checkpoint"] <= MEMORY_TARGET
                                       and result["wall_s"] <= TIME_TARGET_S)
            result["output_bytes"] = folder_bytes(work / ("orbax" if name == "import" else "hf_out"))
            report[name] = result
        print(json.dumps(report, indent=2))
    finally:
        if not FLAGS.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    app.run(main)
