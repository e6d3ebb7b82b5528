"""The arithmetic task: texts, tokenizer, split and scorer against plain integer arithmetic."""

import numpy as np
import pytest

from huginn_jax.tasks import arithmetic
from huginn_jax.tasks.arithmetic import Problem, TaskTokenizer, build_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> TaskTokenizer:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    build_tokenizer().save(str(path))
    return TaskTokenizer.from_file(path)  # the file path, as Huginn-0125's tokenizer.json is read


def test_answers_are_the_sums_written_least_significant_digit_first():
    for problem in arithmetic.heldout_problems()[:200]:
        a, b = problem.prompt.rstrip("=").split("+")
        assert int(a[::-1]) == problem.a and int(b[::-1]) == problem.b
        assert int(problem.answer[::-1]) == problem.a + problem.b
    assert Problem(95, 7).text == "<|begin_text|>59+7=201<|end_text|>"


def test_tokenizer_is_one_token_per_character_and_round_trips(tokenizer):
    problem = Problem(1204, 98)
    ids = tokenizer.encode_text(problem)
    assert len(ids) == len(problem.prompt) + len(problem.answer) + 2
    assert ids[0] == tokenizer.begin_id and ids[-1] == tokenizer.end_id
    assert tokenizer.decode(ids) == problem.text
    assert tokenizer.decode([*tokenizer.encode_text(problem)[len(tokenizer.encode_prompt(problem)):], 5, 6]) \
        == problem.answer + arithmetic.END  # decoding stops at the end token
    with pytest.raises(ValueError, match="expects"):
        TaskTokenizer(type("Fake", (), {"token_to_id": lambda self, t: 0})())


def test_heldout_split_is_fixed_distinct_and_never_trained_on():
    heldout = arithmetic.heldout_problems()
    assert len(set(heldout)) == len(heldout) == arithmetic.HELDOUT_SIZE
    assert heldout[:5] == arithmetic.heldout_problems(5)  # a prefix of the same fixed draw
    digits = [len(str(p.a)) for p in heldout]
    assert set(digits) == set(range(1, arithmetic.MAX_DIGITS + 1))
    # the held-out pairs are excluded from training batches even when a draw hits them
    small = set(arithmetic.heldout_problems())
    for step in range(50):
        batch = arithmetic.training_problems(seed=0, step=step, count=64)
        assert len(batch) == 64 and not small & set(batch)
    assert arithmetic.training_problems(0, 7, 16) == arithmetic.training_problems(0, 7, 16)
    assert arithmetic.training_problems(0, 7, 16) != arithmetic.training_problems(0, 8, 16)


def test_loss_mask_covers_exactly_the_answer_and_end_token(tokenizer):
    problems = [Problem(5, 7), Problem(9999999, 9999999)]
    tokens, mask = tokenizer.training_batch(problems, arithmetic.max_text_tokens())
    for row, problem in enumerate(problems):
        targets = tokens[row, 1:][mask[row, :-1] == 1]
        assert tokenizer.decode(targets) == problem.answer + arithmetic.END
        assert mask[row].sum() == len(problem.answer) + 1
    assert tokens.shape[1] == len(tokenizer.encode_text(problems[1]))  # the longest text fits exactly
    with pytest.raises(ValueError, match="more than the length"):
        tokenizer.training_batch(problems, 10)


def test_score_is_exact_match_up_to_the_end_token():
    problem = Problem(19, 1)
    assert arithmetic.score("02<|end_text|>7", problem)
    assert not arithmetic.score("020<|end_text|>", problem)
    assert not arithmetic.score("2", problem)


def test_operand_lengths_are_uniform():
    problems = arithmetic.sample_problems(np.random.default_rng(0), 7000)
    counts = np.bincount([len(str(p.a)) for p in problems], minlength=8)[1:]
    assert counts.min() > 850 and counts.max() < 1150
