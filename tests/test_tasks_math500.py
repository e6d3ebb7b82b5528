"""MATH500: the prompt formats, and math-verify grading against hand-judged equivalences."""

from __future__ import annotations

import threading

import pytest

from huginn_jax.tasks import math500
from huginn_jax.tasks.oracle import run_oracle
from tests.lm_eval_tasks import SUBSET

TASK = math500.MATH500()


@pytest.fixture(scope="module")
def docs():
    return {d["answer"]: d for d in TASK.load_docs(SUBSET)}


def test_prompts():
    doc = {"problem": "What is $1+1$?", "answer": "2", "unique_id": "x"}
    instruction = "Please reason step by step, and put your final answer within \\boxed{}."
    assert TASK.render(doc) == f"Problem:\nWhat is $1+1$?\n\n{instruction}\n\nSolution:"
    assert TASK.render(doc, chat=True) == [{"role": "user", "content": f"What is $1+1$?\n{instruction}"}]
    assert TASK.render(doc, chat=True, system_prompt="Be brief.")[0] == {"role": "system", "content": "Be brief."}
    assert TASK.stop_strings == ("Problem:",)


# (gold answer, completion, equivalent?) judged by hand
CASES = [
    ("\\frac{14}{3}", "So $x = \\boxed{\\dfrac{14}{3}}$.", True),
    ("\\frac{14}{3}", "Hence \\boxed{14/3}", True),
    ("\\frac{14}{3}", "\\boxed{\\frac{28}{6}}", True),
    ("\\frac{14}{3}", "\\boxed{\\frac{3}{14}}", False),
    ("\\frac{14}{3}", "I cannot solve this.", False),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "\\boxed{(3, \\pi/2)}", True),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "\\boxed{(\\frac{\\pi}{2}, 3)}", False),  # order matters
    ("\\text{Evelyn}", "The winner is \\boxed{\\text{Evelyn}}.", True),
    ("\\text{Evelyn}", "\\boxed{\\text{Bob}}", False),
    ("90^\\circ", "\\boxed{90^\\circ}", True),
    ("6 - 5i", "\\boxed{-5i+6}", True),
    ("6 - 5i", "\\boxed{6+5i}", False),
    ("1,-2", "The roots are \\boxed{-2, 1}", True),  # a set of solutions, any order
    ("1,-2", "\\boxed{1}", False),
    ("x^5 - x^4 + x^3 - x^2 + x - 1", "\\boxed{(x-1)(x^4+x^2+1)}", True),
    ("x^5 - x^4 + x^3 - x^2 + x - 1", "\\boxed{x^5-1}", False),
    ("p - q", "\\boxed{-q+p}", True),
    ("p - q", "\\boxed{q-p}", False),
]


def test_math_verify_grading_matches_hand_judgement(docs):
    for gold, completion, equivalent in CASES:
        score = TASK.score(docs[gold], completion)
        assert score["correct"] is equivalent, (gold, completion, score)
        assert score["metrics"] == {"math_verify": equivalent} and score["gold"] == gold
    assert TASK.score(docs["p - q"], "no answer")["extracted"] == "[invalid]"


def test_the_answer_before_a_new_problem_counts(docs):
    doc = docs["\\frac{14}{3}"]
    assert TASK.score(doc, "\\boxed{\\frac{14}{3}}\n\nProblem: next. \\boxed{7}")["correct"]
    assert not TASK.score(doc, "\\boxed{7}\n\nProblem: next. \\boxed{\\frac{14}{3}}")["correct"]


def test_grading_works_off_the_main_thread(docs):
    """math-verify's SIGALRM timeouts only work in the main thread; elsewhere they are off."""
    results = []
    thread = threading.Thread(target=lambda: results.append(
        TASK.score(docs["6 - 5i"], "\\boxed{6-5i}")["correct"]))
    thread.start()
    thread.join()
    assert results == [True]


def test_oracle_scores_every_subset_document(docs):
    result = run_oracle(TASK, list(docs.values()))
    assert result.accuracy == {"math_verify": 1.0} and result.misses == []
    assert len(docs) == 9
