"""The evaluation runner: the paper's Table 1 protocol for every sampler, on any checkpoint.

    model = Model.load(checkpoint)
    rows = resolve_rows(["ar", "diffusion-main"], num_steps=32, gen_kwargs={})
    task = get_task("gsm8k_cot")
    requests = build_requests(task, task.load_docs(data_dir), model.tokenizer, chat=False)
    run = Runner(model, settings)                     # settings: seed, batch size, ...
    records = run.run(task, requests, rows[0], output_dir / "ar" / "gsm8k_cot.jsonl")
    summary = summarize_run(records)

A row of Table 1 (`table1_rows`) is a sampler and its options by the reference's names; every row
samples with the paper's setting (temperature 0.2, top-p 0.95: `PAPER_SAMPLING`) unless the
options say otherwise (`temperature=0` is greedy). Generation stops at the task's stop strings
(matched on the device) and the tokenizer's end tokens, or after the task's token budget.

What the runner guarantees:
- every prompt is the exact text handed to the tokenizer (a chat goes through the checkpoint's
  chat template, `tasks.base.chat_prompt_text`); it is encoded without adding special tokens when
  it already starts with the bos token (lm-eval's rule), with them otherwise;
- requests of similar length are batched together (longest first); a short last batch is padded
  with copies of its first request, so every batch of a run has the same number of rows;
- each request draws its randomness from `jax.random.fold_in(key(seed), index)` (its position in
  the task's document list), and every sampler gives a row what it would give alone, so results do
  not depend on the batch size, the batching, the process count or on resuming;
- compilation is not timed: the first batch of every new shape (row, batch rows, padded prompt
  length, token budget) runs once untimed before its timed run (`Settings.warmup`);
- each finished batch is appended to the JSON lines file at once; a rerun with the same settings
  skips the documents already there (a torn last line from a crash is dropped); a rerun with
  different settings is refused (they are stored next to the records);
- data parallel over processes: each process takes every `count`-th request of the length-sorted
  list (`process_share`), writes its own shard file while it runs, and process 0 merges all
  shards into the run's file at the end (`Parallel`). Within a process, a device mesh
  (`Runner(..., mesh=)`, `huginn_jax.sharding`) splits each batch's rows over its data axis and
  each layer over its model axis; any other generator plugs in as the `generate` function (same
  signature as `samplers.text.complete`).

Tokens per second (`summarize_run`): a sample's generated tokens, up to and including the stop,
over the wall time of its batch; the median over samples is the paper's measure at batch size 1,
the aggregate (all tokens over the summed batch times) is the throughput at the batch size used.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import numpy as np

from huginn_jax.config import HuginnConfig
from huginn_jax.pretrained import load_model_and_tokenizer
from huginn_jax.tasks import records as records_lib
from huginn_jax.tasks.base import Doc, Task, chat_prompt_text
from huginn_jax.tokenizer import Tokenizer
from samplers.common import PROMPT_BUCKET
from samplers.diffusion import PRESETS
from samplers.dispatch import SAMPLERS, SAMPLING_OPTIONS, SHORT_NAMES, resolve, sampler_name, with_sampling
from samplers.sampling import SamplingConfig
from samplers.text import TextOutput, complete

PAPER_SAMPLING = SamplingConfig(do_sample=True, temperature=0.2, top_p=0.95)
"""The paper's sampling (App. of arXiv 2510.14961, as the Huginn paper): temperature 0.2, top-p
0.95 (top-k 50 is Hugging Face's default when sampling, which the reference ran under)."""

RUNNER_OPTIONS = ("max_new_tokens", "stop_strings", "stop_token_ids", "tokenizer", "key", "streamer",
                  "sampling", "config", "return_analysis_tablets", "record_exit_values", "mesh")
"""Sampler options the runner sets itself (or that change the output record); not for gen_kwargs."""

CUSTOM_ROW = "custom"


# ---------------------------------------------------------------- sampler rows

@dataclasses.dataclass(frozen=True)
class SamplerRow:
    """One row of Table 1: a sampler and its options by the reference's names."""

    name: str  # the --samplers name
    label: str  # as the paper's Table 1 names the row
    sampler: str  # reference name of the sampler (dispatch.SAMPLERS)
    options: Mapping[str, Any]  # sampler options, num_steps included
    sampling: SamplingConfig = PAPER_SAMPLING

    def describe(self) -> dict[str, Any]:
        """JSON-able settings of the row (stored next to its records and in the summary)."""
        return {"name": self.name, "label": self.label, "sampler": self.sampler, "options": dict(self.options),
                "sampling": dataclasses.asdict(self.sampling)}


def table1_rows(num_steps: int = 32) -> dict[str, SamplerRow]:
    """Every row of the paper's Table 1 with its settings (the LaTeX comments of the table name
    them). The adaptive row keeps a KV slot per core layer (`latest-m4`): with the reference's
    `full` cache, positions that exited early leave later tokens nothing to attend to at the
    deeper steps they skipped, and accuracy collapses."""
    ar = SHORT_NAMES["ar"]
    return {
        "ar": SamplerRow("ar", f"Static AR r={num_steps}", ar, {"num_steps": num_steps}),
        "ar-r4": SamplerRow("ar-r4", "Static AR r=4", ar, {"num_steps": 4}),
        "ar-r8": SamplerRow("ar-r8", "Static AR r=8", ar, {"num_steps": 8}),
        "ar-r64": SamplerRow("ar-r64", "Static AR r=64", ar, {"num_steps": 64}),
        "adaptive": SamplerRow("adaptive", "Adaptive-compute AR (latent-diff, 0.03)", SHORT_NAMES["adaptive"],
                               {"num_steps": num_steps, "criterion": "latent-diff", "exit_threshold": 0.03,
                                "cache_lookup_strategy": "latest-m4"}),
        "speculative": SamplerRow("speculative", "Self-speculative decoding (4 drafts x 4 steps)",
                                  SHORT_NAMES["speculative"],
                                  {"num_steps": num_steps, "draft_steps": 4, "lookahead_for_draft": 4,
                                   "verification_threshold": 1.0}),
        "diffusion-main": SamplerRow("diffusion-main", "Diff. sampler r'=4, beta_t=0 (default)",
                                     SHORT_NAMES["diffusion"], {"num_steps": num_steps, **PRESETS["paper-main"]}),
        "diffusion-fast": SamplerRow("diffusion-fast", "Diff. sampler r'=2, beta_t=0.5",
                                     SHORT_NAMES["diffusion"], {"num_steps": num_steps, **PRESETS["paper-fast"]}),
    }


ROW_NAMES = (*table1_rows(), CUSTOM_ROW)
"""What --samplers accepts: the rows of Table 1, and `custom` (the sampler and options of --gen_kwargs)."""


def base_options(sampler: str, num_steps: int) -> dict[str, Any]:
    """The options an evaluation gives a sampler (reference name) that gen_kwargs do not set:
    `num_steps`, and for adaptive exits the `latest-m4` cache (see `table1_rows`)."""
    if sampler == SHORT_NAMES["adaptive"]:
        return {"num_steps": num_steps, "cache_lookup_strategy": "latest-m4"}
    return {"num_steps": num_steps}


def sampler_defaults(sampler: str, num_steps: int) -> tuple[str, dict[str, Any]]:
    """(the reference name of a sampler, its default options) for `sampler=...` in gen_kwargs: a
    row of Table 1 (`diffusion-main`, ...) gives the row's sampler and settings; a sampler name
    (`ar`, `adaptive`, `speculative`, `diffusion` or a reference name) its `base_options`."""
    rows = table1_rows(num_steps)
    if sampler in rows:
        return rows[sampler].sampler, dict(rows[sampler].options)
    name = resolve(sampler, {})
    return name, base_options(name, num_steps)


def accepted_options(sampler: str) -> set[str]:
    """The keyword options of a sampler (reference name)."""
    return {p.name for p in inspect.signature(SAMPLERS[sampler]).parameters.values()
            if p.kind == inspect.Parameter.KEYWORD_ONLY}


def resolve_rows(names: Sequence[str], num_steps: int, gen_kwargs: Mapping[str, Any],
                 sampling: SamplingConfig = PAPER_SAMPLING) -> list[SamplerRow]:
    """The rows called `names`, each with `gen_kwargs` applied on top of its options: sampling
    options (temperature, top_p, ...; temperature 0 is greedy) set its sampling, the others its
    sampler options (which the row's sampler must take). `custom` is the sampler that gen_kwargs
    chooses (`sampler=` a sampler or a row name, see `sampler_defaults`; else the reference's
    option names choose) with those options. ValueError names the bad name or option."""
    rows = table1_rows(num_steps)
    unknown = [n for n in names if n not in ROW_NAMES]
    if unknown:
        raise ValueError(f"--samplers: unknown row(s) {unknown}; the rows are {', '.join(ROW_NAMES)}")
    if not names:
        raise ValueError("--samplers: name at least one row")
    repeated = sorted({n for n in names if list(names).count(n) > 1})
    if repeated:
        raise ValueError(f"--samplers: {repeated} named more than once")
    extra = dict(gen_kwargs)
    chosen = extra.pop("sampler", None)
    if chosen is not None and list(names) != [CUSTOM_ROW]:
        raise ValueError("--gen_kwargs: sampler=... chooses the sampler of the `custom` row; "
                         "use it with --samplers=custom")
    reserved = sorted(set(extra) & set(RUNNER_OPTIONS))
    if reserved:
        hint = " (use --max_new_tokens)" if "max_new_tokens" in reserved else ""
        raise ValueError(f"--gen_kwargs: {reserved} are set by the evaluation itself{hint}")
    sampling_options = {k: extra.pop(k) for k in SAMPLING_OPTIONS if k in extra}
    try:
        row_sampling = with_sampling(sampling_options, sampling)["sampling"]
    except (TypeError, ValueError) as err:
        raise ValueError(f"--gen_kwargs: {err}") from None
    resolved = []
    for name in names:
        if name == CUSTOM_ROW:
            try:
                if chosen is not None:
                    sampler, defaults = sampler_defaults(chosen, num_steps)
                else:
                    sampler = sampler_name(extra)
                    defaults = base_options(sampler, num_steps)
            except ValueError as err:
                raise ValueError(f"--gen_kwargs: {err}") from None
            options = {**defaults, **extra}
            label = "custom: " + ", ".join(f"{k}={v}" for k, v in dict(gen_kwargs).items())
            row = SamplerRow(CUSTOM_ROW, label, sampler, options, row_sampling)
        else:
            base = rows[name]
            row = dataclasses.replace(base, options={**base.options, **extra}, sampling=row_sampling)
        unknown_options = sorted(set(row.options) - accepted_options(row.sampler))
        if unknown_options:
            takes = sorted(accepted_options(row.sampler) - set(RUNNER_OPTIONS))
            raise ValueError(f"--gen_kwargs: the {name} row's sampler ({row.sampler}) does not take "
                             f"{unknown_options}; it takes {takes}")
        resolved.append(row)
    return resolved


# ---------------------------------------------------------------- model and requests

@dataclasses.dataclass(frozen=True)
class Model:
    """A checkpoint ready to generate: its config, parameters and tokenizer."""

    config: HuginnConfig
    params: dict
    tokenizer: Tokenizer
    source: str  # the checkpoint folder

    @classmethod
    def load(cls, checkpoint: str | os.PathLike[str], dtype: Any = None) -> "Model":
        config, params, tokenizer = load_model_and_tokenizer(checkpoint, dtype)
        return cls(config, params, tokenizer, os.fspath(checkpoint))


@dataclasses.dataclass(frozen=True)
class Request:
    """One document's prompt, as the tokenizer gets it."""

    index: int  # position in the task's document list: sets the request's random key
    doc: Doc
    doc_id: int | str
    prompt: str  # the exact text given to the tokenizer
    prompt_ids: list[int]
    add_special_tokens: bool  # whether the tokenizer added them (it does when the text lacks the bos)


def prompt_text(task: Task, doc: Doc, tokenizer: Tokenizer, chat: bool = False,
                system_prompt: str | None = None) -> tuple[str, bool]:
    """(the prompt text of `doc`, whether to encode it with special tokens): a chat is rendered
    with the tokenizer's template; a text that already starts with the bos token is encoded
    without adding special tokens (lm-eval's rule), any other text with them."""
    rendered = task.render(doc, chat=chat, system_prompt=system_prompt)
    text = rendered if isinstance(rendered, str) else chat_prompt_text(rendered, tokenizer.apply_chat_template)
    bos = tokenizer.bos_token
    return text, not (bos and text.startswith(bos))


def build_requests(task: Task, docs: Sequence[Doc], tokenizer: Tokenizer, chat: bool = False,
                   system_prompt: str | None = None) -> list[Request]:
    """The requests of `docs` (in order), with a check that the tokenizer can write them."""
    requests = []
    for index, doc in enumerate(docs):
        text, special = prompt_text(task, doc, tokenizer, chat, system_prompt)
        ids = tokenizer.encode(text, add_special_tokens=special)
        requests.append(Request(index, doc, task.doc_id(doc), text, ids, special))
    pad, pad_id = tokenizer.pad_token, tokenizer.pad_token_id
    for request in requests[:1]:  # a character tokenizer maps what it does not know to its pad token
        if pad_id is not None and pad_id in request.prompt_ids and pad not in request.prompt:
            raise ValueError(f"{task.name}: the tokenizer of this checkpoint ({tokenizer.source}) cannot write the "
                             f"task's prompts (unknown characters become {pad}); use a text checkpoint")
    return requests


def check_room(task: Task, requests: Sequence[Request], config: HuginnConfig, max_new_tokens: int) -> None:
    """Every prompt plus its token budget must fit the model's context (checked before any work)."""
    too_long = [r for r in requests if len(r.prompt_ids) + max_new_tokens > config.block_size]
    if too_long:
        first = too_long[0]
        raise ValueError(f"{task.name}: {len(too_long)} prompt(s) plus max_new_tokens={max_new_tokens} exceed the "
                         f"model's context of {config.block_size} tokens (e.g. doc {first.doc_id!r}: "
                         f"{len(first.prompt_ids)} prompt tokens)")


# ---------------------------------------------------------------- batching and processes

def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices into `lengths` in batches of at most `batch_size`, longest first (ties in index
    order), so that each batch holds prompts of similar length and little padding."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


def process_share(requests: Sequence[Request], index: int, count: int) -> list[Request]:
    """This process's requests: every `count`-th of the length-sorted list, starting at `index`,
    so that each process gets the same mix of lengths."""
    if not 0 <= index < count:
        raise ValueError(f"process index {index} is not in [0, {count})")
    order = sorted(requests, key=lambda r: (-len(r.prompt_ids), r.index))
    return order[index::count]


@dataclasses.dataclass(frozen=True)
class Parallel:
    """This process's place among the processes (`jax.process_index()/process_count()`) and how
    their records reach process 0 (`gather`: each process's list -> all lists on process 0)."""

    index: int = 0
    count: int = 1
    gather: Callable[[list[dict]], list[list[dict]]] = dataclasses.field(default=lambda records: [records])

    @classmethod
    def from_jax(cls) -> "Parallel":
        count = jax.process_count()
        return cls(jax.process_index(), count, gather_across_processes) if count > 1 else cls()

    @property
    def is_writer(self) -> bool:
        return self.index == 0


def gather_across_processes(records: list[dict]) -> list[list[dict]]:
    """Every process's records, on every process (JSON bytes through `process_allgather`)."""
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(records).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int64))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: data.size] = data
    gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [json.loads(bytes(row[:n]).decode()) for row, n in zip(gathered, sizes)]


# ---------------------------------------------------------------- records on disk

def read_records(path: Path) -> list[dict]:
    """The records of a JSON lines file ([] if it does not exist). A torn last line (a crash
    while writing) is cut off the file; a bad line elsewhere is an error naming it."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):  # the last line, without its newline: cut it off
                with open(path, "r+b") as f:
                    f.truncate(len(raw) - len(line))
                break
            raise ValueError(f"{path}:{number} is not a JSON line; remove the file (or that line) "
                             f"to evaluate those samples again") from None
    return records


def append_records(path: Path, records: Iterable[Mapping[str, Any]]) -> None:
    """Appends one JSON line per record and flushes them to the disk."""
    with open(path, "a", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def check_settings(path: Path, settings: Mapping[str, Any]) -> None:
    """Stores `settings` at `path`, or checks that they equal the stored ones (a resumed run must
    not mix samples generated differently)."""
    if path.exists():
        stored = json.loads(path.read_text())
        changed = [k for k in sorted(set(stored) | set(settings)) if stored.get(k) != settings.get(k)]
        if changed:
            k = changed[0]
            raise ValueError(f"{path.parent} holds samples generated with other settings ({k}: {stored.get(k)!r} "
                             f"then, {settings.get(k)!r} now); use another --output_dir or remove those files")
        return
    path.write_text(json.dumps(settings, indent=2) + "\n")


# ---------------------------------------------------------------- the runner

@dataclasses.dataclass(frozen=True)
class Settings:
    """What a run's samples depend on (stored with them, see `check_settings`), and how it runs."""

    seed: int = 0
    batch_size: int = 1
    chat: bool = False
    system_prompt: str | None = None
    max_new_tokens: int | None = None  # None: each task's own budget
    warmup: bool = True  # run each new shape once untimed (so no timing includes compilation)
    progress: bool = True

    def identity(self, model: Model, task: Task, row: SamplerRow) -> dict[str, Any]:
        return {"checkpoint": os.path.abspath(model.source), "task": task.name, "row": row.describe(),
                "chat": self.chat, "system_prompt": task.resolve_system_prompt(self.system_prompt)
                if self.chat else self.system_prompt, "seed": self.seed, "batch_size": self.batch_size,
                "max_new_tokens": self.budget(task), "dtype": str(model.params["wte"].dtype)}

    def budget(self, task: Task) -> int:
        return task.max_new_tokens if self.max_new_tokens is None else self.max_new_tokens


def request_keys(seed: int, indices: Sequence[int]) -> jax.Array:
    """One PRNG key per request [B]: the seed's key folded with the request's index."""
    base = jax.random.key(seed)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(np.asarray(indices, np.uint32))


def run_paths(output_dir: Path, row: str, task: str, parallel: Parallel = Parallel()) -> tuple[Path, Path, Path]:
    """(the run's records, its settings, this process's shard of records)."""
    folder = Path(output_dir) / row
    records = folder / f"{task}.jsonl"
    shard = records if parallel.count == 1 else folder / f"{task}.process{parallel.index}-of-{parallel.count}.jsonl"
    return records, folder / f"{task}.settings.json", shard


class Runner:
    """Generates, scores and records the requests of a task with one row at a time."""

    def __init__(self, model: Model, settings: Settings, parallel: Parallel = Parallel(),
                 generate: Callable[..., TextOutput] = complete, mesh: Any = None):
        self.model, self.settings, self.parallel, self.generate = model, settings, parallel, generate
        self.mesh = mesh  # a (data, model) device mesh for every batch, or None (one device)
        self._warm: set[tuple] = set()

    def run(self, task: Task, requests: Sequence[Request], row: SamplerRow, output_dir: Path) -> list[dict]:
        """Evaluates the requests not yet in the row's records; returns the records of `requests`
        in document order (on process 0; the others return the ones they merged)."""
        path, settings_path, shard = run_paths(output_dir, row.name, task.name, self.parallel)
        path.parent.mkdir(parents=True, exist_ok=True)
        budget = self.settings.budget(task)
        check_room(task, requests, self.model.config, budget)
        if self.parallel.is_writer:
            check_settings(settings_path, self.settings.identity(self.model, task, row))
        done = {r["doc_id"] for r in read_records(path)} | {r["doc_id"] for r in read_records(shard)}
        mine = [r for r in process_share(requests, self.parallel.index, self.parallel.count) if r.doc_id not in done]
        batches = length_batches([len(r.prompt_ids) for r in mine], self.settings.batch_size)
        progress = _progress(len(mine), f"{row.name} {task.name}", self.settings.progress and self.parallel.is_writer)
        for batch in batches:
            new = self.run_batch(task, [mine[i] for i in batch], row, budget)
            append_records(shard, new)
            progress.update(len(new))
        progress.close()
        wanted = {r.doc_id for r in requests}
        return [r for r in self._merge(path, shard) if r["doc_id"] in wanted]

    def run_batch(self, task: Task, batch: Sequence[Request], row: SamplerRow, budget: int) -> list[dict]:
        """Generates one batch (padded to the batch size with copies of its first request),
        scores it and returns its records."""
        padded = [*batch, *[batch[0]] * (self.settings.batch_size - len(batch))]
        special = {r.add_special_tokens for r in padded}
        if len(special) > 1:
            raise ValueError(f"{task.name}: some prompts start with the bos token and some do not")
        call = dict(config=self.model.config, max_new_tokens=budget, stop_strings=list(task.stop_strings),
                    sampler=row.sampler, add_special_tokens=special.pop(), sampling=row.sampling,
                    key=request_keys(self.settings.seed, [r.index for r in padded]), **row.options)
        if self.mesh is not None:
            call["mesh"] = self.mesh
        prompts = [r.prompt for r in padded]
        shape = (row.name, len(padded), -(-max(len(r.prompt_ids) for r in padded) // PROMPT_BUCKET), budget,
                 task.stop_strings)
        if self.settings.warmup and shape not in self._warm:
            self.generate(self.model.params, self.model.tokenizer, prompts, **call)
        self._warm.add(shape)
        start = time.perf_counter()
        out = self.generate(self.model.params, self.model.tokenizer, prompts, **call)
        seconds = time.perf_counter() - start
        for request, ids in zip(batch, out.prompt_ids):
            if list(ids) != list(request.prompt_ids):
                raise RuntimeError(f"{task.name} {request.doc_id!r}: the generator encoded the prompt differently")
        completions = out.texts[: len(batch)]
        scores = task.score_many([r.doc for r in batch], completions, chat=self.settings.chat)
        stats = out.output.stats
        records = []
        for i, (request, completion, score) in enumerate(zip(batch, completions, scores)):
            tokens = int(out.output.lengths[i])
            generation = records_lib.GenerationStats(
                new_tokens=tokens, seconds=seconds,
                core_steps=int(np.asarray(out.output.recurrence_steps[i][:tokens]).sum()),
                sequential_core_steps=int(np.asarray(stats["sequential_core_steps"])[i]))
            records.append(records_lib.sample_record(
                task, request.doc, request.prompt, request.prompt_ids, completion, score, generation,
                sampler=row.name, doc_index=request.index, batch_size=len(padded), batch_rows=len(batch),
                core_position_steps=int(np.asarray(stats["core_position_steps"])[i])))
        return records

    def _merge(self, path: Path, shard: Path) -> list[dict]:
        """With several processes: gathers every shard's records that the run's file lacks into
        it (process 0 writes). Returns the run's records in document order."""
        if self.parallel.count > 1:
            merged = {r["doc_id"] for r in read_records(path)}
            pending = [r for r in read_records(shard) if r["doc_id"] not in merged]
            gathered = [r for part in self.parallel.gather(pending) for r in part]
            if not self.parallel.is_writer:
                return pending
            append_records(path, sorted(gathered, key=lambda r: r["doc_index"]))
        return sorted(read_records(path), key=lambda r: r["doc_index"])


def _progress(total: int, description: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit="sample", disable=not enabled or total == 0)


# ---------------------------------------------------------------- summaries and reports

def summarize_run(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """`records.summarize` of one (row, task) run, the wall time being the sum of its batches'
    times (each record holds its batch's time and the number of samples that shared it)."""
    wall = sum(r["seconds"] / r["batch_rows"] for r in records)
    sizes = sorted({int(r["batch_size"]) for r in records})
    summary = records_lib.summarize(records, batch_size=sizes[0] if len(sizes) == 1 else max(sizes),
                                    wall_seconds=wall)
    summary["mean_core_position_steps_per_sample"] = sum(r["core_position_steps"] for r in records) / len(records)
    return summary


def report_markdown(summaries: Mapping[str, Mapping[str, Mapping[str, Any]]], rows: Sequence[SamplerRow],
                    tasks: Sequence[str], display_names: Mapping[str, str], header: str = "",
                    reference: str = "ar") -> str:
    """Table 1 twice (median tokens/s over samples, the paper's measure at batch size 1, with the
    core steps per token; then the aggregate throughput at the batch size used), the accuracy of
    every metric of every task, and the rows' settings."""
    parts = [header] if header else []
    parts.append(records_lib.table1_markdown(summaries, tasks, reference=reference, throughput="median",
                                             display_names=display_names, core_steps=True))
    parts.append(records_lib.table1_markdown(summaries, tasks, reference=reference, throughput="aggregate",
                                             display_names=display_names))
    metric_header = ["Sampler"]
    metric_rows: list[list[str]] = [[row.name] for row in rows]
    for task in tasks:
        names = next((list(s[task]["metrics"]) for s in summaries.values() if task in s), [])
        for metric in names:
            metric_header.append(f"{display_names.get(task, task)} {metric}")
            for cells, row in zip(metric_rows, rows):
                run = summaries.get(row.name, {}).get(task)
                cells.append("-" if run is None else
                             f"{100 * run['metrics'][metric]:.2f}% ({run['num_samples']})")
    lines = ["| " + " | ".join(metric_header) + " |", "|" + "---|" * len(metric_header),
             *("| " + " | ".join(cells) + " |" for cells in metric_rows)]
    parts.append("Accuracy by metric (samples)\n\n" + "\n".join(lines) + "\n")
    legend = [f"- `{row.name}`: {row.label}; `{row.sampler}` with "
              + ", ".join(f"{k}={v}" for k, v in row.options.items())
              + ("; greedy" if not row.sampling.do_sample else
                 f"; temperature {row.sampling.temperature}, top-p {row.sampling.top_p}, top-k {row.sampling.top_k}")
              for row in rows]
    parts.append("Rows\n\n" + "\n".join(legend) + "\n")
    return "\n".join(parts)


def plot_accuracy_vs_speed(summaries: Mapping[str, Mapping[str, Mapping[str, Any]]], rows: Sequence[SamplerRow],
                           tasks: Sequence[str], display_names: Mapping[str, str], path: Path, pyplot: Any) -> None:
    """One panel per task: accuracy against median tokens/s, one point per sampler row, in one
    colour and marker per row across panels (`pyplot` is matplotlib.pyplot, passed in so that the
    library does not need matplotlib)."""
    fig, axes = pyplot.subplots(1, len(tasks), figsize=(4.2 * len(tasks) + 1.8, 3.6), squeeze=False)
    markers = "osD^v<>PX*"
    for ax, task in zip(axes[0], tasks):
        for index, row in enumerate(rows):
            run = summaries.get(row.name, {}).get(task)
            if run is None or not run["median_tokens_per_second"]:
                continue
            ax.scatter([run["median_tokens_per_second"]], [100 * run["accuracy"]], label=row.name,
                       color=f"C{index % 10}", marker=markers[index % len(markers)], alpha=0.8)
        ax.set(xlabel="tokens / s (median over samples)", ylabel="accuracy (%)", ylim=(-3, 103),
               title=display_names.get(task, task))
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1 - 1.6 / fig.get_figwidth(), 1))
    fig.savefig(path, dpi=120)
    pyplot.close(fig)
