"""`python -m experiments.evaluate` and its runner (samplers/evaluation.py): the rows of Table 1,
batching, resuming, the outputs, the oracle and prompt dump on the committed data subsets, the
four text tasks through the runner, the random text model generating through it, and one-line
errors.

Compilation is what costs here (a sampler program takes 10-20 s to compile on a busy CPU), so the
script runs one sampler once; resuming, processes and the four text tasks run in process with a
generator that answers from the data, and the random text model generates one sample."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from huginn_jax.tasks import records, registry
from huginn_jax.tasks.arithmetic import EMBEDDED_MODEL
from huginn_jax.tasks.base import chat_prompt_text
from huginn_jax.tokenizer import load_tokenizer
from samplers import evaluation
from samplers.common import GenerateOutput
from samplers.diffusion import PRESETS
from samplers.evaluation import Request
from samplers.text import TextOutput
from tests.text_model import TEXT_MODEL_CONFIG

REPO = Path(__file__).resolve().parents[1]
SUBSET = REPO / "tests" / "fixtures" / "eval-data-subset"
TOKENIZER = REPO / "tests" / "fixtures" / "huginn-0125-tokenizer"  # Huginn-0125's tokenizer files, no weights
TEXT_TASKS = ("gsm8k_cot", "math500", "humaneval", "mbpp")


def evaluate(*flags: str, expect: int = 0) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_DATASETS_OFFLINE="1")
    run = subprocess.run([sys.executable, "-m", "experiments.evaluate", *flags], capture_output=True, text=True,
                         env=env, cwd=REPO, timeout=600, stdin=subprocess.DEVNULL)
    assert run.returncode == expect, run.stderr[-3000:]
    return run


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------- rows, batching, resume files

def test_rows_carry_the_papers_settings():
    rows = evaluation.table1_rows(32)
    assert list(rows) == ["ar", "ar-r4", "ar-r8", "ar-r64", "adaptive", "speculative", "diffusion-main",
                          "diffusion-fast"]
    assert [rows[f"ar-r{r}"].options["num_steps"] for r in (4, 8, 64)] == [4, 8, 64]
    assert rows["adaptive"].options == {"num_steps": 32, "criterion": "latent-diff", "exit_threshold": 0.03,
                                        "cache_lookup_strategy": "latest-m4"}
    assert rows["speculative"].options == {"num_steps": 32, "draft_steps": 4, "lookahead_for_draft": 4,
                                           "verification_threshold": 1.0}
    for name, preset in (("diffusion-main", "paper-main"), ("diffusion-fast", "paper-fast")):
        assert rows[name].options == {"num_steps": 32, **PRESETS[preset]}
    assert PRESETS["paper-main"]["state_noise_mixing"] == 0.0 and PRESETS["paper-fast"]["inner_recurrence"] == 2
    sampling = rows["ar"].sampling
    assert (sampling.do_sample, sampling.temperature, sampling.top_p) == (True, 0.2, 0.95)


def test_gen_kwargs_on_rows_and_the_custom_row():
    ar, diffusion = evaluation.resolve_rows(["ar", "diffusion-main"], 16, {"temperature": 0, "init_scale": 0.5})
    assert not ar.sampling.do_sample and not diffusion.sampling.do_sample  # temperature 0: greedy
    assert ar.options == {"num_steps": 16, "init_scale": 0.5} and diffusion.options["init_scale"] == 0.5
    (custom,) = evaluation.resolve_rows(["custom"], 32, {"sampler": "diffusion-fast", "max_wavefront": 16})
    assert custom.sampler == "generate_diffusion_style"
    assert custom.options == {"num_steps": 32, **PRESETS["paper-fast"], "max_wavefront": 16}
    (by_names,) = evaluation.resolve_rows(["custom"], 8, {"draft_steps": 2})
    assert by_names.sampler == "generate_speculative" and by_names.options == {"num_steps": 8, "draft_steps": 2}
    # adaptive exits get the latest-m4 cache (with `full`, skipped depths leave nothing to attend to)
    for kwargs in ({"criterion": "kl"}, {"sampler": "generate_with_adaptive_compute", "criterion": "kl"}):
        (adaptive,) = evaluation.resolve_rows(["custom"], 8, kwargs)
        assert adaptive.options == {"num_steps": 8, "cache_lookup_strategy": "latest-m4", "criterion": "kl"}
    (told,) = evaluation.resolve_rows(["custom"], 8, {"criterion": "kl", "cache_lookup_strategy": "full"})
    assert told.options["cache_lookup_strategy"] == "full"
    for names, kwargs, message in [
            (["ar", "nope"], {}, "unknown row"), (["ar", "ar"], {}, "more than once"),
            (["ar"], {"inner_recurrence": 4}, "ar row's sampler"), (["ar"], {"max_new_tokens": 5}, "--max_new_tokens"),
            (["ar"], {"sampler": "diffusion"}, "--samplers=custom"), (["ar"], {"top_p": 2.0}, "top_p"),
            (["custom"], {"sampler": "beam"}, "unknown sampler")]:
        with pytest.raises(ValueError, match=message):
            evaluation.resolve_rows(names, 32, kwargs)


def test_length_batches_and_process_shares():
    lengths = [5, 40, 7, 39, 6, 41, 8]
    batches = evaluation.length_batches(lengths, 3)
    assert batches == [[5, 1, 3], [6, 2, 4], [0]]  # longest first, neighbours in length together
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    requests = [Request(i, {}, i, "", [0] * n, True) for i, n in enumerate(lengths)]
    shares = [evaluation.process_share(requests, p, 3) for p in range(3)]
    assert sorted(r.index for share in shares for r in share) == list(range(len(lengths)))
    assert [len(s) for s in shares] == [3, 2, 2]
    with pytest.raises(ValueError):
        evaluation.process_share(requests, 3, 3)


def test_records_file_drops_a_torn_line_and_refuses_other_settings(tmp_path):
    path = tmp_path / "run.jsonl"
    evaluation.append_records(path, [{"doc_id": 1}, {"doc_id": 2}])
    with open(path, "a") as f:
        f.write('{"doc_id": 3, "compl')  # a crash in the middle of a line
    assert evaluation.read_records(path) == [{"doc_id": 1}, {"doc_id": 2}]
    evaluation.append_records(path, [{"doc_id": 3}])
    assert evaluation.read_records(path) == [{"doc_id": 1}, {"doc_id": 2}, {"doc_id": 3}]
    path.write_text('{"doc_id": 1}\nnot json\n{"doc_id": 3}\n')
    with pytest.raises(ValueError, match="run.jsonl:2"):
        evaluation.read_records(path)
    settings = tmp_path / "run.settings.json"
    evaluation.check_settings(settings, {"seed": 0, "chat": False})
    evaluation.check_settings(settings, {"seed": 0, "chat": False})
    with pytest.raises(ValueError, match="seed: 0 then, 1 now"):
        evaluation.check_settings(settings, {"seed": 1, "chat": False})


def test_summary_throughput_counts_each_batch_once():
    rows = [{"doc_id": i, "correct": i < 3, "metrics": {"m": i < 3}, "new_tokens": 10 * (i + 1), "seconds": 2.0,
             "batch_rows": 2, "batch_size": 2, "core_steps": 32 * 10 * (i + 1),
             "sequential_core_steps": 32 * 10 * (i + 1), "core_position_steps": 1} for i in range(4)]
    summary = evaluation.summarize_run(rows)  # two batches of two samples, 2 s each
    assert summary["wall_seconds"] == 4.0 and summary["aggregate_tokens_per_second"] == 100 / 4.0
    assert summary["median_tokens_per_second"] == (10 + 15) / 2 and summary["accuracy"] == 0.75


# ---------------------------------------------------------------- the script

def test_the_script_end_to_end(tmp_path, text_model_dir):
    """The random model with the real 65,536-id tokenizer on HumanEval through the chat template
    (the prefilled assistant turn), two documents in one batch: the records (the code ran in the
    sandbox), summary, table and plot; a rerun with other settings in the same folder is refused
    (a rerun with the same ones resumes: see below)."""
    out = tmp_path / "eval"
    common = (f"--checkpoint={text_model_dir}", f"--data_dir={SUBSET}", "--tasks=humaneval", "--chat",
              "--samplers=ar", "--num_steps=2", "--max_new_tokens=6", "--limit=2", "--batch_size=2",
              f"--output_dir={out}")
    first = evaluate(*common)
    task = registry.get_task("humaneval")
    docs = task.load_docs(SUBSET, limit=2)
    tokenizer = load_tokenizer(text_model_dir)
    recs = sorted(jsonl(out / "ar" / "humaneval.jsonl"), key=lambda r: r["doc_index"])  # in batch order
    assert [r["doc_id"] for r in recs] == [task.doc_id(d) for d in docs]
    for r, doc in zip(recs, docs):
        assert list(r)[: len(records.RECORD_FIELDS)] == list(records.RECORD_FIELDS)
        assert r["prompt"] == chat_prompt_text(task.render(doc, chat=True), tokenizer.apply_chat_template)
        assert r["prompt_ids"] == tokenizer.encode(r["prompt"], add_special_tokens=False)
        assert r["gold"] == task.gold(doc) and r["completion"]
        assert 1 <= r["new_tokens"] <= 6 and r["sequential_core_steps"] == r["core_steps"] == 2 * r["new_tokens"]
        assert r["correct"] is False and r["status"] in ("failed", "error", "timeout")  # random weights
        assert r["batch_size"] == 2 and r["seconds"] > 0
    summary = json.loads((out / "summary.json").read_text())
    run = summary["runs"]["ar"]["humaneval"]
    assert run["num_samples"] == 2 and run["accuracy"] == 0.0 and run["batch_size"] == 2
    assert run["total_new_tokens"] == sum(r["new_tokens"] for r in recs)
    table = (out / "table1.md").read_text()
    assert "| Sampler | HumanEval |" in table and "median over samples at batch size 2" in table
    assert "aggregate throughput" in table and "| ar | 0.00% / " in table
    if importlib.util.find_spec("matplotlib"):
        assert (out / "accuracy_vs_tokens_per_second.png").read_bytes()[:4] == b"\x89PNG"
    else:
        assert "no plot" in first.stdout and not (out / "accuracy_vs_tokens_per_second.png").exists()
    refused = evaluate(*common, "--seed=1", expect=1)
    assert refused.stderr.count("\n") <= 2 and "other settings (seed: 0 then, 1 now)" in refused.stderr


def answering_generator(answers: dict[str, str], calls: list):
    """A stand-in for `samplers.text.complete` that answers each prompt with `answers[prompt]` (no
    compilation), recording each call's prompts and keys."""

    def generate(params, tokenizer, prompts, *, key, add_special_tokens, **options):
        calls.append((list(prompts), np.asarray(jax.random.key_data(key)), options))
        ids = [tokenizer.encode(p, add_special_tokens=add_special_tokens) for p in prompts]
        texts = [answers[p] for p in prompts]
        lengths = np.array([len(tokenizer.encode(t, add_special_tokens=False)) + 1 for t in texts])
        width = int(lengths.max())
        out = GenerateOutput(tokens=np.zeros((len(prompts), width), np.int32), lengths=lengths,
                             recurrence_steps=np.full((len(prompts), width), 32),
                             stats={"sequential_core_steps": 32 * lengths, "core_position_steps": 40 * lengths})
        return TextOutput(texts, list(prompts), ids, out)

    return generate


def test_resume_generates_only_the_new_documents(tmp_path):
    model = evaluation.Model.load(EMBEDDED_MODEL)
    task = registry.get_task("arithmetic")
    requests = evaluation.build_requests(task, task.load_docs(limit=3), model.tokenizer)
    calls: list = []
    generate = answering_generator({r.prompt: task.gold(r.doc) for r in requests}, calls)
    settings = evaluation.Settings(batch_size=2, warmup=False, progress=False)
    row = evaluation.resolve_rows(["ar"], 32, {})[0]
    evaluation.Runner(model, settings, generate=generate).run(task, requests[:2], row, tmp_path)
    path = tmp_path / "ar" / "arithmetic.jsonl"
    before = path.read_text().splitlines()
    assert len(before) == 2 and len(calls) == 1
    with open(path, "a") as f:
        f.write('{"doc_id": 2, "compl')  # a crash while the next batch was written
    records_ = evaluation.Runner(model, settings, generate=generate).run(task, requests, row, tmp_path)
    after = path.read_text().splitlines()
    assert after[:2] == before and json.loads(after[2])["doc_id"] == 2 and len(after) == 3
    assert [r["doc_id"] for r in records_] == [0, 1, 2] and all(r["correct"] for r in records_)
    assert len(calls) == 2 and calls[1][0] == [requests[2].prompt] * 2  # only document 2, padded with itself
    assert evaluation.Runner(model, settings, generate=generate).run(task, requests, row, tmp_path) == records_
    assert len(calls) == 2  # nothing left to generate


def test_report_lays_out_table1():
    """Two rows and two tasks: accuracy / median tokens/s, then the difference to static AR (points,
    speedup), the core steps, the same at aggregate throughput, and the per-metric accuracy."""
    def run(accuracy, median, aggregate, batch_size=1):
        return {"accuracy": accuracy, "metrics": {"m": accuracy}, "num_samples": 4, "batch_size": batch_size,
                "median_tokens_per_second": median, "aggregate_tokens_per_second": aggregate,
                "core_steps_per_token": 32.0, "sequential_core_steps_per_token": 8.0}
    rows = evaluation.resolve_rows(["ar", "diffusion-main"], 32, {})
    summaries = {"ar": {"gsm8k_cot": run(0.5, 10.0, 9.0), "mbpp": run(0.25, 20.0, 18.0)},
                 "diffusion-main": {"gsm8k_cot": run(0.5, 45.0, 30.0), "mbpp": run(0.5, 50.0, 36.0)}}
    table = evaluation.report_markdown(summaries, rows, ["gsm8k_cot", "mbpp"], registry.DISPLAY_NAMES, "head\n")
    assert table.startswith("head\n")
    assert "| diffusion-main | 50.00% / 45.0 | 50.00% / 50.0 |" in table  # median first
    assert "| diffusion-main | +0.00 / 4.50× | +25.00 / 2.50× |" in table  # against ar, at the median
    assert "| diffusion-main | +0.00 / 3.33× | +25.00 / 2.00× |" in table  # at the aggregate
    assert "median over samples at batch size 1 (the paper's measure)" in table
    assert "aggregate throughput" in table and "| diffusion-main | 8.0 / 32.0 | 8.0 / 32.0 |" in table
    assert "| ar | 50.00% (4) | 25.00% (4) |" in table and "inner_recurrence=4" in table


def test_oracle_on_the_committed_subsets(tmp_path):
    run = evaluate("--oracle", f"--data_dir={SUBSET}", f"--output_dir={tmp_path}",
                   "--tasks=gsm8k_cot,math500,humaneval,mbpp,arithmetic", "--limit=20")
    result = json.loads((tmp_path / "oracle.json").read_text())["tasks"]
    counts = {"gsm8k_cot": 6, "math500": 9, "humaneval": 5, "mbpp": 6, "arithmetic": 20}  # mbpp: test split only
    for task, count in counts.items():
        assert result[task]["num_docs"] == count and result[task]["misses"] == []
        assert all(a == 1.0 for a in result[task]["accuracy"].values())
    assert set(result["gsm8k_cot"]["accuracy"]) == {"flexible_extract", "strict_match"}
    assert "| GSM8K | 6 | strict_match | 100.00% | - |" in run.stdout


def test_prompts_are_the_tokenizers_input(tmp_path):
    """--dump_prompts (with --chat) writes what the runner gives the tokenizer; in both modes the
    text is the task's rendering (through the chat template as transformers applies it) and the
    ids are what transformers makes of it (with <|begin_text|> added to a plain text)."""
    from transformers import AutoTokenizer

    evaluate("--dump_prompts", "--chat", f"--checkpoint={TOKENIZER}", f"--data_dir={SUBSET}",
             f"--output_dir={tmp_path}")
    hf = AutoTokenizer.from_pretrained(TOKENIZER)
    tokenizer = load_tokenizer(TOKENIZER)
    for name in TEXT_TASKS:
        task = registry.get_task(name)
        docs = task.load_docs(SUBSET)
        dumped = jsonl(tmp_path / "prompts" / f"{name}.jsonl")
        plain = [{"doc_id": r.doc_id, "prompt": r.prompt, "prompt_ids": r.prompt_ids,
                  "add_special_tokens": r.add_special_tokens} for r in evaluation.build_requests(task, docs, tokenizer)]
        for chat, prompts in ((True, dumped), (False, plain)):
            assert [d["doc_id"] for d in prompts] == [task.doc_id(doc) for doc in docs]
            for doc, d in zip(docs, prompts):
                rendered = task.render(doc, chat=chat)
                text = chat_prompt_text(rendered, hf.apply_chat_template) if chat else rendered
                assert d["prompt"] == text and d["add_special_tokens"] is not chat
                assert d["prompt_ids"] == hf(text, add_special_tokens=not chat)["input_ids"]
                assert d["prompt_ids"][0] == hf.bos_token_id


def text_model_without_weights() -> evaluation.Model:
    """Huginn-0125's tokenizer and a config whose context holds the few-shot prompts, for
    generators that do not run the model."""
    config = dataclasses.replace(TEXT_MODEL_CONFIG, block_size=4096)
    return evaluation.Model(config, {"wte": np.zeros((1, 1), np.float32)}, load_tokenizer(TOKENIZER), str(TOKENIZER))


@pytest.mark.parametrize("chat", [False, True])
def test_the_four_text_tasks_score_the_references_through_the_runner(tmp_path, chat):
    """Each task's reference answer (`oracle_completion`) returned as the generation: every record
    is correct, code ran in the sandbox, and the records hold what the tokenizer was given."""
    model = text_model_without_weights()
    row = evaluation.resolve_rows(["ar"], 32, {})[0]
    settings = evaluation.Settings(batch_size=2, chat=chat, warmup=False, progress=False)
    for name in TEXT_TASKS:
        task = registry.get_task(name)
        docs = task.load_docs(SUBSET, limit=3)
        requests = evaluation.build_requests(task, docs, model.tokenizer, chat=chat)
        calls: list = []
        answers = {r.prompt: task.oracle_completion(r.doc, chat) for r in requests}
        got = evaluation.Runner(model, settings, generate=answering_generator(answers, calls)).run(
            task, requests, row, tmp_path)
        assert [r["doc_id"] for r in got] == [task.doc_id(d) for d in docs]
        assert all(r["correct"] for r in got), [(r["doc_id"], r.get("status"), r["extracted"]) for r in got]
        assert set(calls[0][2]["stop_strings"]) == set(task.stop_strings)
        for r, request in zip(got, requests):
            assert r["prompt"] == request.prompt and r["gold"] == task.gold(request.doc)
            assert r["prompt"].startswith("<|begin_text|>") is chat
            assert r["prompt_ids"] == model.tokenizer.encode(r["prompt"], add_special_tokens=not chat)
            if name in ("humaneval", "mbpp"):
                assert r["status"] == "passed"
        summary = evaluation.summarize_run(got)
        assert summary["accuracy"] == 1.0 and set(summary["metrics"]) == set(task.metrics)


def test_one_line_errors(tmp_path):
    cases = [(["--samplers=ar,warp"], 2, "--samplers: unknown row(s) ['warp']"),
             (["--checkpoint=/nonexistent/folder", "--tasks=arithmetic"], 1, "/nonexistent/folder")]
    for flags, code, message in cases:
        run = evaluate(*flags, f"--output_dir={tmp_path}", expect=code)
        lines = run.stderr.strip().splitlines()
        assert 1 <= len(lines) <= 2 and "Traceback" not in run.stderr and message in run.stderr, run.stderr


def test_processes_share_the_documents_and_process_0_merges(tmp_path):
    """Two processes simulated one after the other with a generator that answers from the data
    (no compilation): each document is generated once, with its own key, and process 0 writes
    every record in document order."""
    model = evaluation.Model.load(EMBEDDED_MODEL)
    task = registry.get_task("arithmetic")
    docs = task.load_docs(limit=5)
    requests = evaluation.build_requests(task, docs, model.tokenizer)
    calls: list = []
    generate = answering_generator({r.prompt: task.gold(r.doc) for r in requests}, calls)
    settings = evaluation.Settings(batch_size=2, warmup=False, progress=False, seed=4)
    row = evaluation.resolve_rows(["ar"], 32, {})[0]
    handed: list[list[dict]] = []
    one = evaluation.Parallel(1, 2, gather=lambda pending: handed.append(pending) or [[], pending])
    evaluation.Runner(model, settings, one, generate).run(task, requests, row, tmp_path)
    zero = evaluation.Parallel(0, 2, gather=lambda pending: [pending, handed[0]])
    records = evaluation.Runner(model, settings, zero, generate).run(task, requests, row, tmp_path)
    generated = [p for prompts, _, _ in calls for p in prompts]
    assert sorted(set(generated)) == sorted(r.prompt for r in requests)  # each once (batches padded by copies)
    assert len(generated) == 2 * 3 and all(len(prompts) == 2 for prompts, _, _ in calls)
    merged = jsonl(tmp_path / "ar" / "arithmetic.jsonl")
    assert [r["doc_id"] for r in merged] == [r["doc_id"] for r in records] == [0, 1, 2, 3, 4]
    assert all(r["correct"] for r in merged)
    shards = [len(jsonl(tmp_path / "ar" / f"arithmetic.process{p}-of-2.jsonl")) for p in (0, 1)]
    assert shards == [3, 2]  # every other document of the length-sorted list
    by_prompt = {r.prompt: r.index for r in requests}
    for prompts, keys, _ in calls:
        want = np.asarray(jax.random.key_data(evaluation.request_keys(4, [by_prompt[p] for p in prompts])))
        assert (keys == want).all()
