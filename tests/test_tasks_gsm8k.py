"""gsm8k_cot against lm-evaluation-harness itself: prompts (plain, and chat with the real Huginn
tokenizer as lm-eval's HFLM applies it, few-shot as multi-turn, the README's system prompt),
stop strings, and both filters with their exact-match metric on a set of completions."""

from __future__ import annotations

import functools
import types

import pytest

from huginn_jax.tasks import gsm8k
from huginn_jax.tasks.base import chat_prompt_text
from huginn_jax.tasks.oracle import run_oracle
from tests.lm_eval_tasks import SUBSET, TOKENIZER, hf_chat_template, local_task

TASK = gsm8k.GSM8KCoT()


@pytest.fixture(scope="module")
def lm_eval_gsm8k(tmp_path_factory):
    monkeypatch = pytest.MonkeyPatch()
    try:
        yield local_task("gsm8k_cot", SUBSET / "gsm8k" / "test.jsonl", tmp_path_factory.mktemp("gsm"), monkeypatch)
    finally:
        monkeypatch.undo()


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER)


@pytest.fixture(scope="module")
def docs():
    return TASK.load_docs(SUBSET)


def test_documents_and_settings_are_lm_evals(lm_eval_gsm8k, docs):
    theirs = list(lm_eval_gsm8k.test_docs())
    assert [{k: d[k] for k in ("question", "answer")} for d in docs] == theirs
    assert [TASK.gold(d) for d in docs] == [lm_eval_gsm8k.doc_to_target(d) for d in theirs]
    config = lm_eval_gsm8k.config
    assert list(TASK.stop_strings) == config.generation_kwargs["until"]
    assert config.num_fewshot == len(gsm8k.FEWSHOT) == 8
    assert [(s["question"], s["target"]) for s in config.fewshot_config.samples] == list(gsm8k.FEWSHOT)
    assert TASK.max_new_tokens == 256  # lm-eval's default max_gen_toks; the yaml sets none
    assert "max_gen_toks" not in config.generation_kwargs


@pytest.mark.parametrize("system_prompt", [None, gsm8k.SYSTEM_PROMPT])
def test_plain_prompt_is_lm_evals(lm_eval_gsm8k, docs, system_prompt):
    for doc, theirs in zip(docs, lm_eval_gsm8k.test_docs()):
        expected = lm_eval_gsm8k.fewshot_context(theirs, num_fewshot=8, system_instruction=system_prompt)
        assert TASK.render(doc, chat=False, system_prompt=system_prompt) == expected
    assert TASK.render(docs[0]).startswith("Q: There are 15 trees") and TASK.render(docs[0]).endswith("\nA:")


@pytest.mark.parametrize("system_prompt", [None, "", "You are a helpful assistant."])
def test_chat_prompt_is_lm_evals_with_the_huginn_template(lm_eval_gsm8k, hf_tokenizer, docs, system_prompt):
    """lm-eval --apply_chat_template --fewshot_as_multiturn [--system_instruction] on HFLM."""
    template = hf_chat_template(hf_tokenizer)
    their_system = gsm8k.SYSTEM_PROMPT if system_prompt is None else (system_prompt or None)
    for doc, theirs in zip(docs, lm_eval_gsm8k.test_docs()):
        expected = lm_eval_gsm8k.fewshot_context(
            theirs, num_fewshot=8, system_instruction=their_system, apply_chat_template=True,
            fewshot_as_multiturn=True, chat_template=template)
        messages = TASK.render(doc, chat=True, system_prompt=system_prompt)
        assert chat_prompt_text(messages, hf_tokenizer.apply_chat_template) == expected
    assert expected.startswith("<|begin_text|><|begin_header|>")
    assert expected.endswith("<|begin_header|>Huginn<|end_header|>\n\n")
    assert (gsm8k.SYSTEM_PROMPT in expected) == (system_prompt is None)
    assert expected.count("<|end_turn|>") == 17 + (their_system is not None)  # 8 shots x 2, the question


def lm_eval_filtered(task, doc: dict, completion: str) -> dict[str, tuple[str, float]]:
    """lm-eval's filters and exact-match metric on one completion: {filter: (value, match)}."""
    results = {}
    for ensemble in task._filters:
        instance = types.SimpleNamespace(resps=[completion], doc=doc, filtered_resps={})
        ensemble.apply([instance])
        value = instance.filtered_resps[ensemble.name]
        results[ensemble.name] = (value, task.process_results(doc, [value])["exact_match"])
    return results


def completions_for(gold: str) -> list[str]:
    number = int(gold.replace(",", ""))
    with_commas = f"{number:,}"
    return [
        f" She has 3 + 4 = 7 left. The answer is {gold}.",
        f" The answer is {with_commas}.\n\n",
        f" The answer is ${with_commas}.",
        f" The answer is {number}",               # no character after the number: strict misses
        f" The answer is {number}.00.",
        f" So {number} - 1 = {number - 1}. The answer is {number - 1}.",
        f" The answer is {number} apples, I think 12.",
        f" It costs ${number}.50 in total",
        " The answer is -3.",
        " I am not sure. The answer is unknown.",
        " 5 5",
        "",
        f" The ANSWER IS {number}.",
        f"#### {number}",
        f"{number}\n1.",
        f" twelve, so {number},",
    ]


def test_filters_and_metric_agree_with_lm_eval(lm_eval_gsm8k, docs):
    checked = 0
    for doc, theirs in zip(docs, lm_eval_gsm8k.test_docs()):
        for completion in completions_for(TASK.gold(doc)):
            expected = lm_eval_filtered(lm_eval_gsm8k, theirs, completion)
            score = TASK.score(doc, completion)
            assert (score["extracted"], float(score["metrics"]["flexible_extract"])) == expected["flexible-extract"]
            assert (score["extracted_strict"], float(score["metrics"]["strict_match"])) == expected["strict-match"]
            assert score["correct"] == score["metrics"]["flexible_extract"]
            checked += 1
    assert checked == len(docs) * 16
    # the set exercises both outcomes of both filters, and the "[invalid]" fallback
    outcomes = {(k, v) for doc in docs for c in completions_for(TASK.gold(doc))
                for k, v in TASK.score(doc, c)["metrics"].items()}
    assert outcomes == {("flexible_extract", True), ("flexible_extract", False),
                        ("strict_match", True), ("strict_match", False)}
    assert TASK.score(docs[0], "no digits here")["extracted"] == "[invalid]"


def test_score_cuts_at_stop_strings_like_generate_until(docs):
    gold = TASK.gold(docs[0])
    assert TASK.score(docs[0], f" The answer is {gold}.\n\nQ: The answer is 5.")["correct"]
    assert not TASK.score(docs[0], f" The answer is 5.\n\nQ: The answer is {gold}.")["correct"]
    assert TASK.extract(f" It is {gold}.</s> 99") == f"{gold}."  # the filter keeps the dot; the metric drops it


def test_oracle_scores_every_subset_document(docs):
    result = run_oracle(TASK, docs)
    assert result.accuracy == {"flexible_extract": 1.0, "strict_match": 1.0} and result.misses == []
    oracle = TASK.oracle_completion(docs[0])
    assert "<<" not in oracle and oracle.endswith("The answer is 18.\n\nQ:")
    # the oracle is graded, not trusted: another document's answer fails
    assert not TASK.score(docs[1], TASK.oracle_completion(docs[0]))["correct"]


def test_chat_messages_use_the_readme_system_prompt_by_default(docs):
    messages = TASK.render(docs[0], chat=True)
    assert messages[0] == {"role": "system", "content": gsm8k.SYSTEM_PROMPT}
    assert [m["role"] for m in messages[1:]] == ["user", "assistant"] * 8 + ["user"]
    assert TASK.render(docs[0], chat=True, system_prompt="")[0]["role"] == "user"
    assert functools.reduce(lambda a, m: a + m["content"], messages, "").count("Q: ") == 9
