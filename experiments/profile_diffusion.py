"""Where a diffusion sampler step spends its time, what a diffusion call costs to compile, and its
tokens/s against static AR measured side by side.

    python -m experiments.profile_diffusion                     # `cpu` benchmark profile, random weights
    python -m experiments.profile_diffusion --model=embedded    # the arithmetic model, paper-main
    python -m experiments.profile_diffusion --repeats=7 --output=benchmarks/diffusion_profile.jsonl

Three measurements, printed as JSON lines:
1. compile: seconds of the first diffusion call (compilation and one run) minus the median of the
   later calls, in a process that compiled nothing else before;
2. speed: diffusion and static AR called alternately `--repeats` times (same prompt, same
   prefill depth); the median of each and the median of the per-pair ratios (a shared machine
   slows both of a pair alike);
3. profile: one diffusion call under `jax.profiler`, in a child process that also has XLA write
   its optimized program (XLA_FLAGS --xla_dump_to), which names every operation's named scope
   (`jax.named_scope`). Each operation's own time (nested operations subtracted) goes to the stage
   whose scope it runs under: prelude, core (core_step), coda, head (inside the sampler step),
   window switch (the sampler step's conditionals and the copies they make), bookkeeping (the
   rest of the sampler step), prefill, and other (outside the step). Shares are of the sampler
   steps' time; `ms_per_step` divides by the number of sampler steps.

The `cpu` model is `experiments.benchmark`'s profile: width 512, random weights, 32 prompt tokens,
64 new tokens, r=32 prefill, and its diffusion setting (fixed freeze, r'=4, no noise, no momentum,
shared cache, max_wavefront 128). `embedded` is the arithmetic model that ships in the package, on
a batch of held-out problems with the paper-main preset.
"""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_enum("model", "cpu", ["cpu", "embedded"], "The `cpu` benchmark profile (random weights) or the "
                  "embedded arithmetic model.")
flags.DEFINE_integer("batch", 1, "Sequences per call (embedded: held-out problems).")
flags.DEFINE_integer("new_tokens", None, "New tokens per sequence (default: 64 for cpu, 10 for embedded).")
flags.DEFINE_integer("repeats", 5, "Timed diffusion / AR pairs; medians are reported.")
flags.DEFINE_bool("profile", True, "Also trace one diffusion call and attribute its time to stages.")
flags.DEFINE_bool("compare_ar", True, "Time static AR alternately with the diffusion sampler.")
flags.DEFINE_string("output", None, "Also append the JSON lines to this file.")
flags.DEFINE_bool("trace_only", False, "Internal: the child process that traces (XLA_FLAGS set by the parent).")
flags.DEFINE_string("dump_dir", None, "Internal: where the child's XLA writes its optimized programs.")

STAGES = ("prelude", "core", "coda", "head", "window switch", "bookkeeping")
MODEL_SCOPES = {"prelude": "prelude", "core_step": "core", "coda": "coda", "head": "head"}
STEP_SCOPE = "sampler_step"  # the diffusion sampler runs each step under this named scope
PREFILL_SCOPE = "prefill"
CONTAINERS = {"while", "conditional", "call"}  # operations whose time is that of the operations they run


# ---------------------------------------------------------------- workloads

def workload() -> tuple[Callable[[], Any], Callable[[], Any], int]:
    """(a diffusion call, the static AR call it is compared with, tokens each generates at most)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from samplers import generate_diffusion_style, generate_minimal
    from samplers.diffusion import PRESETS

    if FLAGS.model == "cpu":
        from huginn_jax.config import CPU_BENCHMARK
        from huginn_jax.params import init_params

        config, new_tokens = CPU_BENCHMARK, FLAGS.new_tokens or 64
        params = init_params(config, jax.random.key(0), jnp.float32)
        prompts = np.random.default_rng(0).integers(0, config.vocab_size, (FLAGS.batch, 32), dtype=np.int32)
        common = dict(config=config, max_new_tokens=new_tokens, num_steps=32, init_scale=0.0, stop_token_ids=())
        diffusion = dict(freeze_strategy="fixed", inner_recurrence=4, state_noise_mixing=0.0, ema_embeds=0.0,
                         exit_t=0.03, max_wavefront=128, headway=1, cache_lookup_strategy="latest-m4-compress-s4")
        ar = dict(cache_lookup_strategy="full")
    else:
        from experiments.common import load_task_model
        from huginn_jax.tasks.arithmetic import EMBEDDED_MODEL, heldout_problems

        config, params, tokenizer = load_task_model(EMBEDDED_MODEL)
        new_tokens = FLAGS.new_tokens or 10
        prompts = tokenizer.prompt_batch(heldout_problems()[: FLAGS.batch])
        common = dict(config=config, max_new_tokens=new_tokens, num_steps=32, stop_token_ids=[tokenizer.end_id],
                      key=jax.random.key(0))
        diffusion, ar = dict(PRESETS["paper-main"]), {}
    return (lambda: generate_diffusion_style(params, prompts, **common, **diffusion),
            lambda: generate_minimal(params, prompts, **common, **ar), new_tokens)


def seconds(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def generated(out: Any) -> int:
    return int(sum(len(s) for s in out.sequences()))


# ---------------------------------------------------------------- profile

def scope_of_operations(dump_dir: Path) -> dict[tuple[int, str], tuple[str, str]]:
    """(program id, operation name) -> (opcode, op_name: the named-scope path) from XLA's optimized
    programs. A fusion without metadata takes that of the first fused operation that has some."""
    instruction = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*? ([a-z][\w\-]*)\(")
    op_name = re.compile(r'op_name="([^"]*)"')
    calls = re.compile(r"calls=%?([\w.\-]+)")
    computation = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
    table: dict[tuple[int, str], tuple[str, str]] = {}
    for path in dump_dir.glob("module_*.cpu_after_optimizations.txt"):
        program = int(path.name.split(".")[0].split("_")[1])
        first_name: dict[str, str] = {}  # computation -> first op_name inside it
        rows = []
        current = None
        for line in path.read_text().splitlines():
            head = computation.match(line)
            if head and "=" not in line.split("{")[0]:
                current = head.group(1)
                continue
            match = instruction.match(line)
            if not match:
                continue
            name = op_name.search(line)
            called = calls.search(line)
            rows.append((match.group(1), match.group(2), name.group(1) if name else "",
                         called.group(1) if called else None))
            if name and current is not None:
                first_name.setdefault(current, name.group(1))
        for name, opcode, scope, called in rows:
            if not scope and called:
                scope = first_name.get(called, "")
            table[(program, name)] = (opcode, scope)
    return table


def stage_of(opcode: str, scope: str) -> str | None:
    """The stage an operation's own time counts for, or None for a loop or call (its own time is
    that of running its body, which is counted there). A conditional that selects the step's window
    (directly under the step's scope) is the window switch; other conditionals count for the stage
    they run in."""
    parts = scope.split("/")
    if PREFILL_SCOPE in parts:
        return None if opcode in CONTAINERS else "prefill"
    if STEP_SCOPE not in parts:
        return None if opcode in CONTAINERS else "other"
    inner = parts[parts.index(STEP_SCOPE) + 1:]
    if opcode == "conditional" and inner in (["cond"], ["switch"]):
        return "window switch"
    if opcode in CONTAINERS:
        return None
    for part in inner:
        if part in MODEL_SCOPES:
            return MODEL_SCOPES[part]
    return "bookkeeping"


def bookkeeping_part(scope: str) -> str:
    """The sampler's own named scope an operation runs under (the first inside the step)."""
    parts = scope.split("/")
    inner = parts[parts.index(STEP_SCOPE) + 1:] if STEP_SCOPE in parts else []
    named = [p for p in inner if p and p.isidentifier() and p not in ("cond", "while", "body", "switch")
             and not p.startswith("branch_")]
    return named[0] if named else "(unscoped)"


def own_times(trace_dir: Path) -> list[tuple[int, str, float]]:
    """(program id, operation, own seconds) of every XLA operation in the trace: its duration
    minus that of the operations nested in it on the same thread."""
    import jax

    events = []
    for path in trace_dir.rglob("*.xplane.pb"):
        data = jax.profiler.ProfileData.from_file(str(path))
        for plane in data.planes:
            for line in plane.lines:
                rows = []
                for event in line.events:
                    stats = dict(event.stats)
                    if "hlo_op" in stats:
                        rows.append((event.start_ns, event.start_ns + event.duration_ns,
                                     int(stats.get("program_id", -1)), str(stats["hlo_op"])))
                rows.sort(key=lambda r: (r[0], -r[1]))
                stack: list[list] = []  # [end, program, op, own]
                for start, end, program, op in rows:
                    while stack and stack[-1][0] <= start:
                        done = stack.pop()
                        events.append((done[1], done[2], done[3] / 1e9))
                    if stack:
                        stack[-1][3] -= end - start
                    stack.append([end, program, op, end - start])
                events.extend((p, o, own / 1e9) for _, p, o, own in stack)
    return events


def trace_child() -> None:
    """Runs in the child process: warm up, trace one diffusion call, attribute its time."""
    import jax

    diffusion, _, _ = workload()
    diffusion()  # compiles
    trace_dir = tempfile.mkdtemp(prefix="diffusion-trace-")
    try:
        jax.profiler.start_trace(trace_dir)
        took, out = seconds(diffusion)
        jax.profiler.stop_trace()
        operations = own_times(Path(trace_dir))
    finally:
        shutil.rmtree(trace_dir, ignore_errors=True)
    steps = int(max(out.stats["diffusion_steps"]))
    table = scope_of_operations(Path(FLAGS.dump_dir))
    totals: dict[str, float] = collections.Counter()
    parts: dict[str, float] = collections.Counter()
    unknown = 0.0
    for program, op, own in operations:
        if (program, op) not in table:
            unknown += own
            continue
        opcode, scope = table[(program, op)]
        stage = stage_of(opcode, scope)
        if stage is not None:
            totals[stage] += own
        if stage == "bookkeeping":
            parts[bookkeeping_part(scope)] += own
    step_total = sum(totals[s] for s in STAGES)
    per_step = 1e3 / max(steps, 1)
    record = dict(measurement="profile", model=FLAGS.model, batch=FLAGS.batch, call_seconds=round(took, 4),
                  diffusion_steps=steps, ms_per_step=round(step_total * per_step, 3),
                  share={s: round(totals[s] / step_total, 4) for s in STAGES},
                  stage_ms_per_step={s: round(totals[s] * per_step, 3) for s in STAGES},
                  bookkeeping_ms_per_step={k: round(v * per_step, 3) for k, v in sorted(parts.items(),
                                                                                         key=lambda kv: -kv[1])},
                  prefill_seconds=round(totals["prefill"], 4), other_seconds=round(totals["other"], 4),
                  unattributed_seconds=round(unknown, 4))
    print("PROFILE " + json.dumps(record), flush=True)


def run_profile_child() -> dict:
    """Starts this script as a child that traces (XLA writes its programs only there)."""
    dump_dir = tempfile.mkdtemp(prefix="diffusion-hlo-")
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_dump_to={dump_dir} --xla_dump_hlo_as_text"
                        " --xla_dump_hlo_module_re=.*(generate|diffusion|phase|start).*").strip()
    command = [sys.executable, "-m", "experiments.profile_diffusion", "--trace_only", f"--dump_dir={dump_dir}",
               f"--model={FLAGS.model}", f"--batch={FLAGS.batch}"]
    if FLAGS.new_tokens:
        command.append(f"--new_tokens={FLAGS.new_tokens}")
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    finally:
        shutil.rmtree(dump_dir, ignore_errors=True)
    for line in done.stdout.splitlines():
        if line.startswith("PROFILE "):
            return json.loads(line[len("PROFILE "):])
    raise RuntimeError(f"the profiling child failed: {done.stderr.strip().splitlines()[-3:]}")


# ---------------------------------------------------------------- main

def emit(record: dict) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if FLAGS.output:
        with open(FLAGS.output, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def main(argv: list[str]) -> None:
    del argv
    from experiments.common import quiet_jax_logs

    quiet_jax_logs()
    if FLAGS.trace_only:
        trace_child()
        return
    diffusion, ar, _ = workload()
    first, out = seconds(diffusion)
    tokens = generated(out)
    steady = [seconds(diffusion)[0]]
    if FLAGS.compare_ar:
        ar_out = ar()
        ar_tokens = generated(ar_out)
    pairs = []
    for _ in range(FLAGS.repeats):
        took = seconds(diffusion)[0]
        steady.append(took)
        if FLAGS.compare_ar:
            pairs.append((took, seconds(ar)[0]))
    median = statistics.median(steady)
    emit(dict(measurement="compile", model=FLAGS.model, batch=FLAGS.batch, first_call_seconds=round(first, 3),
              steady_call_seconds=round(median, 4), compile_seconds=round(first - median, 3),
              diffusion_steps=int(max(out.stats["diffusion_steps"]))))
    if FLAGS.compare_ar:
        d = statistics.median(p[0] for p in pairs)
        a = statistics.median(p[1] for p in pairs)
        emit(dict(measurement="speed", model=FLAGS.model, batch=FLAGS.batch, repeats=FLAGS.repeats,
                  diffusion_tokens_per_s=round(tokens / d, 3), ar_tokens_per_s=round(ar_tokens / a, 3),
                  ratio_median_of_pairs=round(statistics.median(
                      (tokens / p) / (ar_tokens / q) for p, q in pairs), 3),
                  ratios=[round((tokens / p) / (ar_tokens / q), 3) for p, q in pairs]))
    if FLAGS.profile:
        emit(run_profile_child())


if __name__ == "__main__":
    app.run(main)
