"""The task registry, data loading, chat rendering, the arithmetic adapter, the oracle on every
committed subset, and the record / summary / Table-1 builders."""

from __future__ import annotations

import json
import statistics
import sys

import pytest

from huginn_jax.tasks import arithmetic, records
from huginn_jax.tasks.arithmetic_eval import Arithmetic
from huginn_jax.tasks.base import chat_prompt_text, cut_at_stop
from huginn_jax.tasks.data import TaskDataError
from huginn_jax.tasks.oracle import run_oracle
from huginn_jax.tasks.registry import TASK_NAMES, get_task
from tests.lm_eval_tasks import SUBSET, TOKENIZER


def test_registry_names_every_task_and_rejects_others():
    assert [get_task(name).name for name in TASK_NAMES] == list(TASK_NAMES)
    with pytest.raises(ValueError, match="unknown task 'gsm8k'.*gsm8k_cot, math500"):
        get_task("gsm8k")
    for name in TASK_NAMES:
        task = get_task(name)
        assert task.max_new_tokens > 0 and task.stop_strings and task.metrics


@pytest.mark.parametrize("name", ["gsm8k_cot", "math500", "humaneval", "mbpp", "arithmetic"])
def test_oracle_is_perfect_on_the_committed_subsets(name):
    task = get_task(name)
    docs = task.load_docs(SUBSET)
    result = run_oracle(task, docs)
    assert result.num_docs == len(docs) >= 5
    assert set(result.accuracy.values()) == {1.0} and result.misses == []
    ids = [task.doc_id(d) for d in docs]
    assert len(set(ids)) == len(ids)


def test_missing_data_names_the_option_and_the_file(tmp_path):
    with pytest.raises(TaskDataError, match=r"--data_dir=.*math500/test.jsonl.*does not exist"):
        get_task("math500").load_docs(tmp_path)
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text('{"question": "q", "answer": "#### 1"}\nnot json\n')
    with pytest.raises(TaskDataError, match=r"test.jsonl:2: not a JSON line"):
        get_task("gsm8k_cot").load_docs(tmp_path)
    with pytest.raises(ValueError, match="limit"):
        get_task("gsm8k_cot").load_docs(SUBSET, limit=-1)
    assert [d["doc_id"] for d in get_task("gsm8k_cot").load_docs(SUBSET, limit=2)] == [0, 1]


def test_without_data_dir_offline_or_without_datasets_the_error_says_data_dir(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(TaskDataError, match=r"no --data_dir given and openai/gsm8k could not be loaded"
                                            r".*pass --data_dir=DIR with gsm8k/test.jsonl"):
        get_task("gsm8k_cot").load_docs()
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(TaskDataError, match=r"`datasets` package is not installed.*--data_dir=DIR with "
                                            r"humaneval/HumanEval.jsonl"):
        get_task("humaneval").load_docs()


def test_cut_at_stop_is_lm_evals_until():
    assert cut_at_stop("a Q: b </s> c", ("Q:", "</s>")) == "a "
    assert cut_at_stop("a </s> b Q: c", ("Q:", "</s>")) == "a "
    assert cut_at_stop("no stop", ("Q:",)) == "no stop"
    assert cut_at_stop("x", ("", "y")) == "x"


def test_chat_prompt_text_is_transformers_continue_final_message():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    base = [{"role": "system", "content": "Be exact."}, {"role": "user", "content": " Hi \n"}]
    for last in ("Sure:\n", "Sure: ", "Sure:"):
        messages = [*base, {"role": "assistant", "content": last}]
        expected = tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True)
        assert chat_prompt_text(messages, tokenizer.apply_chat_template) == expected
        assert expected.endswith("<|begin_header|>Huginn<|end_header|>\n\nSure:")
    expected = tokenizer.apply_chat_template(base, tokenize=False, add_generation_prompt=True)
    assert chat_prompt_text(base, tokenizer.apply_chat_template) == expected
    assert expected.endswith("<|end_turn|><|begin_header|>Huginn<|end_header|>\n\n")


def test_arithmetic_prompts_are_the_embedded_models_token_prompts():
    from tokenizers import Tokenizer

    task = Arithmetic()
    tokenizer = Tokenizer.from_file(str(arithmetic.EMBEDDED_MODEL / "tokenizer.json"))
    task_tokenizer = arithmetic.TaskTokenizer(tokenizer)
    docs = task.load_docs(limit=50)
    assert len(docs) == 50 and len(task.load_docs()) == arithmetic.HELDOUT_SIZE
    for doc, problem in zip(docs, arithmetic.heldout_problems()):
        ids = tokenizer.encode(task.render(doc), add_special_tokens=False).ids
        assert ids == task_tokenizer.encode_prompt(problem)
        answer_ids = task_tokenizer.encode_text(problem)[len(ids):]
        completion = task_tokenizer.decode(answer_ids + [5, 6])  # generation past the end token
        assert task.score(doc, completion)["correct"] and task.extract(completion) == problem.answer
        assert not task.score(doc, problem.answer + "1" + arithmetic.END)["correct"]
    with pytest.raises(ValueError, match="no chat format"):
        task.render(docs[0], chat=True)


# ---------------------------------------------------------------- records, summaries, Table 1

def fake_records(task, accuracy_pattern, tokens, seconds):
    docs = task.load_docs(SUBSET) if task.name != "arithmetic" else task.load_docs(limit=len(tokens))
    out = []
    for doc, ok, n, s in zip(docs, accuracy_pattern, tokens, seconds):
        completion = task.oracle_completion(doc) if ok else "wrong"
        score = task.score(doc, completion)
        assert score["correct"] == ok
        stats = records.GenerationStats(new_tokens=n, seconds=s, core_steps=32 * n, sequential_core_steps=8 * n)
        out.append(records.sample_record(task, doc, prompt=str(task.render(doc)), prompt_ids=[1, 2, 3],
                                         completion=completion, score=score, stats=stats, sampler="x"))
    return out


def test_sample_record_has_the_issues_fields_and_is_json():
    task = get_task("gsm8k_cot")
    (record,) = fake_records(task, [True], [40], [2.0])
    assert list(record)[:len(records.RECORD_FIELDS)] == list(records.RECORD_FIELDS)
    assert record["correct"] is True and record["gold"] == "18" and record["extracted"] == "18."
    assert record["metrics"] == {"flexible_extract": True, "strict_match": True}
    assert record["extracted_strict"] == "18" and record["task"] == "gsm8k_cot" and record["sampler"] == "x"
    assert json.loads(json.dumps(record)) == record
    (code,) = fake_records(get_task("humaneval"), [False], [10], [1.0])
    assert code["status"] == "failed" and "Error" in code["stderr_tail"]


def test_summary_is_the_naive_computation():
    task = get_task("gsm8k_cot")
    tokens, seconds = [40, 10, 30, 20], [2.0, 1.0, 1.0, 4.0]
    rows = fake_records(task, [True, False, True, True], tokens, seconds)
    summary = records.summarize(rows, batch_size=1, wall_seconds=10.0)
    assert summary["num_samples"] == 4 and summary["accuracy"] == 0.75
    assert summary["metrics"] == {"flexible_extract": 0.75, "strict_match": 0.75}
    assert summary["median_tokens_per_second"] == statistics.median([20, 10, 30, 5]) == 15.0
    assert summary["aggregate_tokens_per_second"] == 100 / 10.0
    assert summary["core_steps_per_token"] == 32.0 and summary["sequential_core_steps_per_token"] == 8.0
    assert records.summarize(rows)["aggregate_tokens_per_second"] is None  # needs the run's wall time
    with pytest.raises(ValueError, match="no records"):
        records.summarize([])


def run_summary(accuracy, median, aggregate=None, batch_size=1):
    return {"accuracy": accuracy, "median_tokens_per_second": median, "aggregate_tokens_per_second": aggregate,
            "batch_size": batch_size, "core_steps_per_token": 32.0, "sequential_core_steps_per_token": 7.25}


def test_table1_layout_matches_the_paper():
    summaries = {  # the paper's GSM8K and MBPP numbers for three rows
        "ar": {"gsm8k_cot": run_summary(0.4177, 36.1), "mbpp": run_summary(0.316, 15.3)},
        "ar-r4": {"gsm8k_cot": run_summary(0.0159, 312.9), "mbpp": run_summary(0.014, 49.6)},
        "diffusion-main": {"gsm8k_cot": run_summary(0.4208, 157.3)},
    }
    table = records.table1_markdown(summaries, ["gsm8k_cot", "mbpp"],
                                    display_names={"gsm8k_cot": "GSM8K", "mbpp": "MBPP"}, core_steps=True)
    lines = table.splitlines()
    assert "median over samples at batch size 1 (the paper's measure)" in lines[0]
    assert lines[2] == "| Sampler | GSM8K | MBPP |"
    assert "| ar | 41.77% / 36.1 | 31.60% / 15.3 |" in lines
    assert "| diffusion-main | 42.08% / 157.3 | - |" in lines
    assert "| diffusion-main | +0.31 / 4.36× | - |" in lines  # the paper's relative row
    assert "| ar-r4 | -40.18 / 8.67× | -30.20 / 3.24× |" in lines
    assert not any(line.startswith("| ar | +") for line in lines)
    assert "| ar | 7.2 / 32.0 | 7.2 / 32.0 |" in lines

    batched = {s: {t: run_summary(r["accuracy"], None, 2 * r["median_tokens_per_second"], 8)
                   for t, r in runs.items()} for s, runs in summaries.items()}
    table = records.table1_markdown(batched, ["gsm8k_cot"], throughput="aggregate")
    assert "aggregate throughput (all generated tokens / wall time) at batch size 8" in table
    assert "| ar | 41.77% / 72.2 |" in table and "| diffusion-main | +0.31 / 4.36× |" in table
    assert "| ar | 41.77% / - |" in records.table1_markdown(batched, ["gsm8k_cot"])  # no median at batch 8
