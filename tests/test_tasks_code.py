"""HumanEval and MBPP against lm-evaluation-harness's own tasks (prompts in both modes, stop
strings, few-shot problems, the program that is run), and pass@1 through the sandbox."""

from __future__ import annotations

import json

import pytest

from huginn_jax.tasks import humaneval, mbpp
from huginn_jax.tasks.base import chat_prompt_text
from huginn_jax.tasks.oracle import run_oracle
from tests.lm_eval_tasks import SUBSET, TOKENIZER, hf_chat_template, local_task

HUMANEVAL, MBPP = humaneval.HumanEval(), mbpp.MBPP()


@pytest.fixture(scope="module")
def lm_eval_tasks(tmp_path_factory):
    monkeypatch = pytest.MonkeyPatch()
    tmp = tmp_path_factory.mktemp("code")
    try:
        yield {name: local_task(name, SUBSET / folder, tmp, monkeypatch) for name, folder in [
            ("humaneval", "humaneval/HumanEval.jsonl"), ("humaneval_instruct", "humaneval/HumanEval.jsonl"),
            ("mbpp", "mbpp/mbpp.jsonl")]}
    finally:
        monkeypatch.undo()


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER)


def test_humaneval_plain_prompt_stops_and_program_are_lm_evals(lm_eval_tasks):
    theirs = lm_eval_tasks["humaneval"]
    docs = HUMANEVAL.load_docs(SUBSET)
    assert docs == list(theirs.test_docs()) and len(docs) == 5
    assert list(HUMANEVAL.stop_strings) == theirs.config.generation_kwargs["until"]
    assert HUMANEVAL.max_new_tokens == theirs.config.generation_kwargs["max_gen_toks"]
    build_predictions = theirs._filters[0].filters[0].keywords["filter_fn"]
    for doc in docs:
        assert HUMANEVAL.render(doc) == theirs.fewshot_context(doc, num_fewshot=0) == doc["prompt"]
        completion = "    return 1\n\n\ndef helper():\n    pass"
        code = HUMANEVAL.extract(completion)
        assert code == "    return 1\n\n"
        candidate = build_predictions([[code]], [doc])[0][0]
        assert humaneval.program(doc, code) == f"{candidate}\n{theirs.doc_to_target(doc)}"


def test_humaneval_chat_prompt_is_lm_evals_humaneval_instruct(lm_eval_tasks, hf_tokenizer):
    """The reference README's command: humaneval_instruct with the chat template, whose
    assistant turn starts with the pre-filled answer prefix."""
    theirs = lm_eval_tasks["humaneval_instruct"]
    template = hf_chat_template(hf_tokenizer)
    build_predictions = theirs._filters[0].filters[0].keywords["filter_fn"]
    for doc in HUMANEVAL.load_docs(SUBSET):
        for system_prompt in (None, "You are a helpful assistant."):
            expected = theirs.fewshot_context(doc, num_fewshot=0, system_instruction=system_prompt,
                                              apply_chat_template=True, chat_template=template,
                                              gen_prefix=theirs.doc_to_prefix(doc))
            messages = HUMANEVAL.render(doc, chat=True, system_prompt=system_prompt)
            assert chat_prompt_text(messages, hf_tokenizer.apply_chat_template) == expected
        assert expected.endswith("<|begin_header|>Huginn<|end_header|>\n\nHere is the completed function:\n```python\n"
                                 + doc["prompt"].rstrip())
        completion = "\n    return 0\n```\nSome explanation\ndef other(): pass"
        code = HUMANEVAL.extract(completion, chat=True)
        assert doc["prompt"] + code == build_predictions([[completion]], [doc])[0][0]


def test_mbpp_fewshot_problems_are_the_data_sets_and_lm_evals(lm_eval_tasks):
    theirs = lm_eval_tasks["mbpp"]
    assert [dict(s, is_fewshot=True) for s in mbpp.FEWSHOT] == theirs.config.fewshot_config.samples()
    with open(SUBSET / "mbpp" / "mbpp.jsonl", encoding="utf-8") as f:
        rows = {row["task_id"]: row for row in map(json.loads, f)}
    for shot in mbpp.FEWSHOT:
        assert {k: rows[shot["task_id"]][k] for k in shot} == shot
    assert theirs.config.target_delimiter == "" and theirs.config.num_fewshot == 3
    assert list(MBPP.stop_strings) == theirs.config.generation_kwargs["until"]


def test_mbpp_uses_the_test_split_only():
    docs = MBPP.load_docs(SUBSET)
    assert [d["task_id"] for d in docs] == [11, 12, 13, 14, 15, 367]  # not 2-4 (shots), not 511
    assert [d["task_id"] for d in MBPP.load_docs(SUBSET, limit=2)] == [11, 12]


@pytest.mark.parametrize("chat", [False, True])
def test_mbpp_prompt_is_lm_evals(lm_eval_tasks, hf_tokenizer, chat):
    theirs = lm_eval_tasks["mbpp"]
    template = hf_chat_template(hf_tokenizer)
    by_id = {d["task_id"]: d for d in theirs.test_docs()}
    for doc in MBPP.load_docs(SUBSET):
        for system_prompt in (None, "You are an expert."):
            expected = theirs.fewshot_context(by_id[doc["task_id"]], num_fewshot=3,
                                              system_instruction=system_prompt, apply_chat_template=chat,
                                              fewshot_as_multiturn=chat, chat_template=template if chat else None)
            prompt = MBPP.render(doc, chat=chat, system_prompt=system_prompt)
            assert (chat_prompt_text(prompt, hf_tokenizer.apply_chat_template) if chat else prompt) == expected
    assert expected.count("[BEGIN]") == 4 and expected.count("[DONE]") == 3


def test_mbpp_program_is_lm_evals_plus_the_setup_code(lm_eval_tasks):
    theirs = lm_eval_tasks["mbpp"]
    by_id = {d["task_id"]: d for d in theirs.test_docs()}
    for doc in MBPP.load_docs(SUBSET):
        code = MBPP.extract(doc["code"] + "\n[DONE]\nextra")
        assert code == doc["code"] + "\n"
        lm_eval_program = f"{code}\n{theirs.doc_to_target(by_id[doc['task_id']])}"
        if doc["test_setup_code"]:
            assert mbpp.program(doc, code) == f"{code}\n{doc['test_setup_code']}\n" + "\n".join(doc["test_list"])
        else:
            assert mbpp.program(doc, code) == lm_eval_program


def test_oracles_pass_and_wrong_code_fails():
    """The reference solutions pass in both modes; a wrong or truncated body fails; task 367
    fails without its setup code (as it does in lm-eval)."""
    he_docs, mbpp_docs = HUMANEVAL.load_docs(SUBSET), MBPP.load_docs(SUBSET)
    for chat in (False, True):
        result = run_oracle(HUMANEVAL, he_docs, chat=chat)
        assert result.accuracy == {"pass@1": 1.0} and result.misses == [], result.misses
    result = run_oracle(MBPP, mbpp_docs)
    assert result.accuracy == {"pass@1": 1.0} and result.misses == [], result.misses
    wrong = HUMANEVAL.score_many(he_docs, ["    return None\n"] * len(he_docs))
    assert [s["status"] for s in wrong] == ["failed"] * len(he_docs)
    assert "AssertionError" in wrong[0]["stderr_tail"]
    first_line_only = he_docs[0]["canonical_solution"].splitlines()[0] + "\n"
    assert not HUMANEVAL.score(he_docs[0], first_line_only)["correct"]
    swapped = MBPP.score_many(mbpp_docs[:2], [mbpp_docs[1]["code"], mbpp_docs[0]["code"]])
    assert [s["correct"] for s in swapped] == [False, False]
    tree = next(d for d in mbpp_docs if d["task_id"] == 367)
    assert MBPP.score(tree, tree["code"])["correct"]
    assert not MBPP.score(dict(tree, test_setup_code=""), tree["code"])["correct"]
