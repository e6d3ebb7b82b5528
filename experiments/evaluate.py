"""The paper's Table 1 for any checkpoint: GSM8K CoT, MATH500, HumanEval, MBPP (and the embedded
model's arithmetic) with every sampler, accuracy and tokens per second side by side.

    python -m experiments.evaluate                                   # the embedded model, arithmetic
    python -m experiments.evaluate --checkpoint=ckpt/huginn-0125 --dtype=bfloat16 \\
        --data_dir=../shared/eval-data --tasks=gsm8k_cot,math500,humaneval,mbpp \\
        --samplers=ar,ar-r4,ar-r8,ar-r64,adaptive,speculative,diffusion-fast,diffusion-main
    python -m experiments.evaluate --oracle --data_dir=DIR --tasks=gsm8k_cot,mbpp   # no model: grade the references
    python -m experiments.evaluate --dump_prompts --checkpoint=DIR --data_dir=DIR   # write the prompts, stop
    python -m experiments.evaluate ... --distributed [--coordinator_address=HOST:PORT --num_processes=N
        --process_id=I] [--mesh=DATA,MODEL]     # one process per host, each its share; process 0 writes

Writes under --output_dir: `<row>/<task>.jsonl` (one record per sample: doc_id, prompt, prompt_ids,
completion, extracted, gold, correct, new_tokens, seconds, core_steps, sequential_core_steps, ...),
`<row>/<task>.settings.json`, `summary.json`, `table1.md` (Table 1's layout: accuracy / tokens per
second, then accuracy difference and speedup against static AR r=--num_steps) and
`accuracy_vs_tokens_per_second.png`. A rerun with the same flags resumes: samples already in the
JSON lines are skipped. Sampling follows the paper (temperature 0.2, top-p 0.95); --greedy or
--gen_kwargs=temperature=0 decodes greedily. See samplers/evaluation.py for the protocol.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import jax
from absl import flags

from experiments.common import define_device_flags, pyplot, quiet_jax_logs, start_devices
from huginn_jax import cli
from huginn_jax.tasks import oracle, registry
from huginn_jax.tasks.arithmetic import EMBEDDED_MODEL
from huginn_jax.tasks.data import TaskDataError
from huginn_jax.tokenizer import load_tokenizer
from samplers import evaluation
from samplers.dispatch import parse_gen_kwargs
from samplers.sampling import GREEDY

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", str(EMBEDDED_MODEL),
                    "A converted (python -m convert) or Hugging Face layout checkpoint folder with its tokenizer.")
flags.DEFINE_list("tasks", None, f"Tasks among {', '.join(registry.TASK_NAMES)} (default: arithmetic for the "
                  "embedded model, else gsm8k_cot,math500,humaneval,mbpp).")
flags.DEFINE_list("samplers", ["ar", "diffusion-main"], f"Rows of Table 1: {', '.join(evaluation.ROW_NAMES)} "
                  "(custom: the sampler and options of --gen_kwargs).")
flags.DEFINE_integer("num_steps", 32, "r: recurrence of the `ar` row, the adaptive cap, the verifier and the "
                     "diffusion prefill.")
flags.DEFINE_string("gen_kwargs", "", "Options by the reference's names on top of every row, lm-eval style: "
                    "'temperature=0,max_wavefront=64' (sampler=NAME with --samplers=custom).")
flags.DEFINE_bool("greedy", False, "Greedy decoding instead of the paper's temperature 0.2, top-p 0.95.")
flags.DEFINE_integer("limit", None, "Evaluate the first N documents of each task.")
flags.DEFINE_integer("batch_size", 1, "Requests per batch (similar lengths together); the paper measures at 1.")
flags.DEFINE_integer("max_new_tokens", None, "Token budget of every task (default: each task's, lm-eval's).")
flags.DEFINE_string("data_dir", None, "Folder in the layout of shared/eval-data (default: the datasets "
                    "library's hub copies, which need the package and a network).")
flags.DEFINE_bool("chat", False, "Prompts through the checkpoint's chat template (the reference README's "
                  "protocol: few-shot as a multi-turn conversation, the task's system prompt).")
flags.DEFINE_string("system", None, "System prompt (default with --chat: the task's; '' for none).")
flags.DEFINE_string("output_dir", "eval_results", "Where records, summaries, the table and the plot go.")
flags.DEFINE_bool("oracle", False, "Grade each data set's own reference answers instead of generations "
                  "(no model needed): prompts, extraction, grading and the sandbox must give 100 %.")
flags.DEFINE_bool("dump_prompts", False, "Write every prompt (text and token ids) and stop.")
flags.DEFINE_integer("seed", 0, "Seed of every request's random key (folded with its document's index).")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Parameter dtype (default: the checkpoint's; "
                  "float32 for Hugging Face folders).")
flags.DEFINE_integer("sandbox_workers", None, "Programs the code tasks run at once (default: the CPU cores).")
flags.DEFINE_bool("warmup", True, "Run each new shape once untimed first, so that no timing includes compilation.")
define_device_flags()


def check_flags() -> tuple[list[str], list[evaluation.SamplerRow]]:
    tasks = FLAGS.tasks
    if tasks is None:
        tasks = ["arithmetic"] if Path(FLAGS.checkpoint).resolve() == EMBEDDED_MODEL.resolve() else \
            ["gsm8k_cot", "math500", "humaneval", "mbpp"]
    unknown = [t for t in tasks if t not in registry.TASK_NAMES]
    if unknown or not tasks:
        raise cli.UsageError(f"--tasks: unknown task(s) {unknown}; the tasks are {', '.join(registry.TASK_NAMES)}")
    for name in ("limit", "sandbox_workers"):
        if FLAGS[name].value is not None and FLAGS[name].value < (0 if name == "limit" else 1):
            raise cli.UsageError(f"--{name} must be >= {0 if name == 'limit' else 1}, got {FLAGS[name].value}")
    for name in ("batch_size", "max_new_tokens", "num_steps"):
        if FLAGS[name].value is not None and FLAGS[name].value < 1:
            raise cli.UsageError(f"--{name} must be >= 1, got {FLAGS[name].value}")
    if FLAGS.oracle and FLAGS.dump_prompts:
        raise cli.UsageError("--oracle and --dump_prompts are separate jobs; pass one of them")
    try:
        gen_kwargs = parse_gen_kwargs(FLAGS.gen_kwargs)
        rows = evaluation.resolve_rows(FLAGS.samplers, FLAGS.num_steps, gen_kwargs,
                                       GREEDY if FLAGS.greedy else evaluation.PAPER_SAMPLING)
    except ValueError as err:
        raise cli.UsageError(str(err)) from None
    return tasks, rows


def load_docs(task, limit):
    try:
        return task.load_docs(FLAGS.data_dir, limit)
    except TaskDataError as err:
        raise cli.UsageError(str(err)) from None


def get_task(name: str):
    return registry.get_task(name, workers=FLAGS.sandbox_workers)


def oracle_job(tasks: list[str], output_dir: Path) -> None:
    """Grades the references of every task; writes oracle.json and oracle.md."""
    results, lines = {}, ["| Task | Documents | Metric | Oracle accuracy | Misses |", "|---|---|---|---|---|"]
    for name in tasks:
        task = get_task(name)
        docs = load_docs(task, FLAGS.limit)
        start = time.perf_counter()
        result = oracle.run_oracle(task, docs, chat=FLAGS.chat, workers=FLAGS.sandbox_workers)
        results[name] = {"num_docs": result.num_docs, "accuracy": result.accuracy, "misses": result.misses,
                         "seconds": time.perf_counter() - start}
        for metric, accuracy in result.accuracy.items():
            misses = [m["doc_id"] for m in result.misses if m["metric"] == metric]
            lines.append(f"| {registry.DISPLAY_NAMES[name]} | {result.num_docs} | {metric} | {100 * accuracy:.2f}% | "
                         f"{', '.join(map(str, misses[:10])) + (' ...' if len(misses) > 10 else '') or '-'} |")
    table = "\n".join(lines) + "\n"
    (output_dir / "oracle.json").write_text(json.dumps({"chat": FLAGS.chat, "data_dir": FLAGS.data_dir,
                                                        "tasks": results}, indent=2) + "\n")
    (output_dir / "oracle.md").write_text(f"Oracle (the data sets' own answers through the tasks' grading, "
                                          f"chat={FLAGS.chat})\n\n{table}")
    print(table, end="")


def dump_prompts_job(tasks: list[str], output_dir: Path) -> None:
    """Writes prompts/<task>.jsonl: doc_id, prompt (the text given to the tokenizer), prompt_ids."""
    tokenizer = load_tokenizer(FLAGS.checkpoint)
    folder = output_dir / "prompts"
    folder.mkdir(parents=True, exist_ok=True)
    for name in tasks:
        task = get_task(name)
        requests = evaluation.build_requests(task, load_docs(task, FLAGS.limit), tokenizer, FLAGS.chat, FLAGS.system)
        with open(folder / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for r in requests:
                f.write(json.dumps({"doc_id": r.doc_id, "prompt": r.prompt, "prompt_ids": r.prompt_ids,
                                    "add_special_tokens": r.add_special_tokens}, ensure_ascii=False) + "\n")
        print(f"{name}: {len(requests)} prompts -> {folder / f'{name}.jsonl'}")


def evaluate_job(tasks: list[str], rows: list[evaluation.SamplerRow], output_dir: Path) -> None:
    mesh = start_devices()  # joins the other processes (--distributed) before any JAX work
    if mesh is not None and FLAGS.batch_size % mesh.shape["data"]:
        raise cli.UsageError(f"--batch_size={FLAGS.batch_size} does not split over the mesh's data axis of "
                             f"{mesh.shape['data']}; pass a multiple of it")
    model = evaluation.Model.load(FLAGS.checkpoint, FLAGS.dtype)
    parallel = evaluation.Parallel.from_jax()
    settings = evaluation.Settings(seed=FLAGS.seed, batch_size=FLAGS.batch_size, chat=FLAGS.chat,
                                   system_prompt=FLAGS.system, max_new_tokens=FLAGS.max_new_tokens,
                                   warmup=FLAGS.warmup)
    runner = evaluation.Runner(model, settings, parallel, mesh=mesh)
    summaries: dict[str, dict[str, dict]] = {row.name: {} for row in rows}
    for name in tasks:
        task = get_task(name)
        requests = evaluation.build_requests(task, load_docs(task, FLAGS.limit), model.tokenizer, FLAGS.chat,
                                             FLAGS.system)
        for row in rows:
            records = runner.run(task, requests, row, output_dir)
            if parallel.is_writer and records:
                summaries[row.name][name] = {**evaluation.summarize_run(records), "row": row.describe()}
                s = summaries[row.name][name]
                print(f"{row.name} {name}: accuracy {100 * s['accuracy']:.2f}% of {s['num_samples']}, "
                      f"median {s['median_tokens_per_second']:.1f} tokens/s, "
                      f"{s['sequential_core_steps_per_token']:.1f} sequential core steps per token")
    if not parallel.is_writer:
        return
    device = (f"{jax.devices()[0].platform} ({jax.devices()[0].device_kind}), {jax.device_count()} device(s), "
              f"{jax.process_count()} process(es), host {platform.machine()}")
    header = (f"Checkpoint `{FLAGS.checkpoint}` ({FLAGS.dtype or 'stored dtype'}), chat={FLAGS.chat}, "
              f"batch size {FLAGS.batch_size}, seed {FLAGS.seed}, limit {FLAGS.limit}, {device}\n")
    display = registry.DISPLAY_NAMES
    table = evaluation.report_markdown(summaries, rows, tasks, display, header)
    (output_dir / "summary.json").write_text(json.dumps(
        {"checkpoint": FLAGS.checkpoint, "device": device, "flags": flag_values(), "runs": summaries}, indent=2) + "\n")
    (output_dir / "table1.md").write_text(table)
    try:
        evaluation.plot_accuracy_vs_speed(summaries, rows, tasks, display,
                                          output_dir / "accuracy_vs_tokens_per_second.png", pyplot())
    except ImportError as err:
        print(f"no plot: {err}")
    print("\n" + table, end="")


def flag_values() -> dict:
    names = ("checkpoint", "tasks", "samplers", "num_steps", "gen_kwargs", "greedy", "limit", "batch_size",
             "max_new_tokens", "data_dir", "chat", "system", "seed", "dtype")
    return {name: FLAGS[name].value for name in names}


def main(argv: list[str]) -> None:
    quiet_jax_logs()
    tasks, rows = check_flags()
    output_dir = Path(FLAGS.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if FLAGS.oracle:
        return oracle_job(tasks, output_dir)
    if FLAGS.dump_prompts:
        return dump_prompts_job(tasks, output_dir)
    return evaluate_job(tasks, rows, output_dir)


if __name__ == "__main__":
    cli.run(main)
