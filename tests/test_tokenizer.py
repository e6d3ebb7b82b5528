"""huginn_jax.tokenizer against transformers' own AutoTokenizer on the real Huginn-0125 files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from huginn_jax.config import TINY
from huginn_jax.tasks.arithmetic import EMBEDDED_MODEL, TaskTokenizer, heldout_problems
from huginn_jax.tokenizer import (TokenizerError, check_fits, check_vocab, clean_up_tokenization, load_tokenizer)

HUGINN_TOKENIZER = Path(__file__).parent / "fixtures" / "huginn-0125-tokenizer"


@pytest.fixture(scope="module")
def ours():
    return load_tokenizer(HUGINN_TOKENIZER)


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(HUGINN_TOKENIZER))


def _random_texts(count: int, seed: int = 0) -> list[str]:
    """Texts drawn from pieces that stress a byte-level BPE: whitespace runs, punctuation, digits,
    accents, CJK, emoji (with modifiers and joiners), special-token look-alikes, code."""
    pieces = [" ", "  ", "   ", "\n", "\n\n", "\t", "\r\n", "\u00a0", "a", "the", "The", "don't", "'s", ".", ",",
              " .", " ?", "!", "...", "0", "12", "3.5", "1st", "2nd", "é", "ü", "ß", "Ω", "日", "本語", "中文",
              "，", "。", "😀", "👍🏽", "👨\u200d👩\u200d👧", "€", "→", "<|", "|>", "<|end_turn|>", "def", "(", ")",
              "{", "}", "==", "+=", "//", "\\frac", "\\n", "$$", "#", "`", '"', "_", "-", "—"]
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(pieces, size=rng.integers(1, 24))) for _ in range(count)]


TEXTS = [
    "", " ", "  ", "\n", "\n\n\n", "\t\tx", "Hello world!", "Hello, world. How are you ?",
    "  leading spaces", "trailing spaces   ", "a  b   c    d     e", "line one\nline two\r\nline three\n",
    "naïve café résumé", "Straße Ωmega ñandú", "日本語のテキストです。", "中文，标点。「引号」", "한국어 텍스트",
    "مرحبا بالعالم", "emoji 😀👍🏽👨‍👩‍👧 🇩🇪", "math: ∀x∈ℝ, x² ≥ 0 → ∑ᵢ aᵢ",
    "a . b ? c ! d , e don't I'm it's we've they're ' quoted '",
    "<|end_text|>", "<|begin_header|>user<|end_header|>\n\nhi<|end_turn|>", "<|not_special|>",
    "def f(x):\n    return x ** 2  # square\n\nprint(f(3))\n",
    "for (int i = 0; i < n; ++i) { a[i] += b[i] >> 1; }",
    "\\frac{a}{b} + \\nabla f \\newcommand{\\R}{\\mathbb{R}} \\n \\not",
    "1st 2nd 3rd 4th 12345 3.14159 1,000,000 0x1F",
    "\u00a0non-breaking\u2009thin\u200bzero-width", "   \n   \n\t  \n", "a" * 300, "ab " * 50,
    "Q: What is 2+2?\nA: 4\n\nQ:", "</s><|im_end|>",
] + _random_texts(60)


def test_special_tokens_and_sizes_match_transformers(ours, hf):
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (65504, 65505, 65509)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (hf.bos_token_id, hf.eos_token_id,
                                                                         hf.pad_token_id)
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == (hf.bos_token, hf.eos_token, hf.pad_token)
    assert ours.special_tokens_map == hf.special_tokens_map
    assert ours.all_special_ids == hf.all_special_ids
    assert ours.all_special_tokens == hf.all_special_tokens
    assert ours.vocab_size == hf.vocab_size == 65536
    assert len(ours) == len(hf) == 65536
    assert ours.get_vocab() == hf.get_vocab()
    assert ours.clean_up_tokenization_spaces == hf.clean_up_tokenization_spaces
    assert ours.chat_template == hf.chat_template
    assert ours.convert_tokens_to_ids(["<|end_turn|>", "Hello"]) == hf.convert_tokens_to_ids(["<|end_turn|>", "Hello"])
    assert ours.end_turn_token_id == 65508


def test_stop_ids_come_from_the_generation_config(ours):
    from transformers import GenerationConfig

    generation = GenerationConfig.from_pretrained(str(HUGINN_TOKENIZER))
    assert ours.stop_token_ids == (generation.eos_token_id,) == (65505,)


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_transformers(ours, hf, add_special_tokens):
    for text in TEXTS:
        assert ours.encode(text, add_special_tokens=add_special_tokens) == \
            hf.encode(text, add_special_tokens=add_special_tokens), text


def test_encode_prepends_begin_text_only_with_special_tokens(ours):
    plain = ours.encode("Hello world!", add_special_tokens=False)
    assert ours.encode("Hello world!") == [65504, *plain]
    assert ours.encode("") == [65504] and ours.encode("", add_special_tokens=False) == []


@pytest.mark.parametrize("skip_special_tokens", [False, True])
def test_decode_of_encoded_texts_matches_transformers(ours, hf, skip_special_tokens):
    for text in TEXTS:
        ids = hf.encode(text)
        assert ours.decode(ids, skip_special_tokens=skip_special_tokens) == \
            hf.decode(ids, skip_special_tokens=skip_special_tokens), text


@pytest.mark.parametrize("clean_up", [None, False, True])
@pytest.mark.parametrize("skip_special_tokens", [False, True])
def test_decode_of_random_ids_matches_transformers(ours, hf, skip_special_tokens, clean_up):
    """Random ids split UTF-8 characters across tokens (both sides must emit the same U+FFFD) and
    mix in special tokens."""
    rng = np.random.default_rng(1)
    partial = [i for i, b in enumerate(ours.token_bytes) if _incomplete_utf8(b)]
    assert len(partial) > 400  # the vocabulary has hundreds of tokens that hold part of a character
    pools = [np.arange(65536), np.arange(65504, 65536), np.asarray(partial)]
    for _ in range(150):
        ids = [int(rng.choice(pools[k])) for k in rng.integers(0, 3, size=int(rng.integers(0, 12)))]
        kwargs = dict(skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=clean_up)
        assert ours.decode(ids, **kwargs) == hf.decode(ids, **kwargs), ids
    ids = hf.encode("€ 日本語 😀 ", add_special_tokens=False)
    for cut in range(len(ids) + 1):  # every prefix, incl. those ending inside a character
        assert ours.decode(ids[:cut]) == hf.decode(ids[:cut])
    assert "\ufffd" in ours.decode(ids[:-2])


def _incomplete_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


def test_decode_accepts_ints_and_arrays(ours, hf):
    ids = hf.encode("array input")
    assert ours.decode(np.asarray(ids, np.int32)) == ours.decode(ids) == hf.decode(ids)
    assert ours.decode(ids[1]) == hf.decode(ids[1])
    assert ours.batch_decode([ids, ids[:2]], skip_special_tokens=True) == \
        hf.batch_decode([ids, ids[:2]], skip_special_tokens=True)
    with pytest.raises(TokenizerError, match="one sequence"):
        ours.decode(np.zeros((2, 3), np.int32))


def test_convert_ids_to_tokens_matches_transformers(ours, hf):
    ids = hf.encode("Hello 😀 <|end_turn|> world", add_special_tokens=True)
    assert ours.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)
    assert ours.convert_ids_to_tokens(ids, skip_special_tokens=True) == \
        hf.convert_ids_to_tokens(ids, skip_special_tokens=True)
    assert ours.convert_ids_to_tokens(ids[1]) == hf.convert_ids_to_tokens(ids[1])


def test_clean_up_is_transformers_clean_up(hf):
    for text in TEXTS:
        assert clean_up_tokenization(text) == hf.clean_up_tokenization(text)


def test_token_bytes_reassemble_every_decode(ours):
    rng = np.random.default_rng(2)
    for _ in range(300):
        ids = rng.integers(0, 65536, size=int(rng.integers(1, 10))).tolist()
        text = b"".join(ours.token_bytes[i] for i in ids).decode("utf-8", "replace")
        assert text == ours.decode(ids, clean_up_tokenization_spaces=False), ids


CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hi there!"}],
    [{"role": "system", "content": "  padded system  \n"}, {"role": "user", "content": "\n Question?\n\n"},
     {"role": "assistant", "content": " Answer. "}, {"role": "user", "content": "And then?"}],
    [{"role": "user", "content": "日本語で答えて 😀"}, {"role": "Huginn", "content": "はい。"},
     {"role": "user", "content": "ありがとう"}, {"role": "assistant", "content": "どういたしまして"}],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}],
    [{"role": "user", "content": "code:\n```python\nprint('x')\n```"},
     {"role": "assistant", "content": "It prints x. <|end_turn|> inside text"}],
    [{"role": "system", "content": "S"}] + [{"role": r, "content": f"turn {i}"}
                                            for i, r in enumerate(["user", "assistant"] * 4)],
]


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("tokenize", [True, False])
def test_chat_template_matches_transformers(ours, hf, add_generation_prompt, tokenize):
    for conversation in CONVERSATIONS:
        kwargs = dict(add_generation_prompt=add_generation_prompt, tokenize=tokenize)
        assert ours.apply_chat_template(conversation, **kwargs) == hf.apply_chat_template(conversation, **kwargs)


def test_chat_prompt_has_one_begin_text_and_the_huginn_header(ours):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = ours.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == ("<|begin_text|><|begin_header|>system<|end_header|>\n\nBe brief.<|end_turn|>"
                    "<|begin_header|>user<|end_header|>\n\nHi<|end_turn|><|begin_header|>Huginn<|end_header|>\n\n")
    ids = ours.apply_chat_template(messages, add_generation_prompt=True)
    assert ids.count(65504) == 1 and ids[0] == 65504
    assert ours.apply_chat_template(messages, tokenize=False).endswith("<|end_text|>")


# Templates that exercise the environment transformers builds: trim_blocks / lstrip_blocks,
# tojson (no HTML escaping, options), loop controls, raise_exception, and the generation block.
ENVIRONMENT_TEMPLATES = [
    "{% for m in messages %}\n  {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}\n",
    "{{ messages | tojson }}|{{ messages[0] | tojson(indent=2, sort_keys=True) }}",
    "{% for m in messages %}{% if loop.index0 == 1 %}{% break %}{% endif %}{{ m.content }}{% endfor %}",
    "{% for m in messages %}{% generation %}<{{ m.content }}>{% endgeneration %}{% endfor %}{{ eos_token }}",
    "{{ bos_token }}{% if add_generation_prompt %}GEN{% endif %}{{ strftime_now('%Y') | length }}",
]


@pytest.mark.parametrize("template", ENVIRONMENT_TEMPLATES)
def test_template_environment_matches_transformers(ours, hf, template):
    messages = [{"role": "user", "content": "<b>&\"é\"</b>"}, {"role": "assistant", "content": "ok"}]
    for gen in (False, True):
        assert ours.apply_chat_template(messages, chat_template=template, tokenize=False,
                                        add_generation_prompt=gen) == \
            hf.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=gen)


def test_chat_template_jinja_file_takes_priority(tmp_path, hf):
    from transformers import AutoTokenizer

    folder = tmp_path / "tok"
    shutil.copytree(HUGINN_TOKENIZER, folder)
    (folder / "chat_template.jinja").write_text("{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}")
    messages = [{"role": "user", "content": "x"}]
    ours = load_tokenizer(folder)
    assert ours.apply_chat_template(messages, tokenize=False) == "[user]x" == \
        AutoTokenizer.from_pretrained(str(folder)).apply_chat_template(messages, tokenize=False)
    assert ours.chat_template_source == str(folder / "chat_template.jinja")


# ---------------------------------------------------------------- the embedded arithmetic model

def test_the_embedded_arithmetic_folder_loads_with_the_same_api():
    from transformers import PreTrainedTokenizerFast

    tokenizer = load_tokenizer(EMBEDDED_MODEL)
    task = TaskTokenizer.from_file(EMBEDDED_MODEL / "tokenizer.json")
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == \
        (task.begin_id, task.end_id, task.pad_id)
    assert tokenizer.stop_token_ids == (task.end_id,)
    assert tokenizer.chat_template is None
    reference = PreTrainedTokenizerFast(tokenizer_file=str(EMBEDDED_MODEL / "tokenizer.json"))
    for problem in heldout_problems(20):
        ids = [tokenizer.bos_token_id, *tokenizer.encode(problem.prompt + problem.answer, add_special_tokens=False),
               tokenizer.eos_token_id]
        assert ids == task.encode_text(problem)
        assert ids[1:-1] == reference.encode(problem.prompt + problem.answer)
        assert tokenizer.decode(ids) == task.decode(ids) == reference.decode(ids)
        assert tokenizer.decode(ids, skip_special_tokens=True) == problem.prompt + problem.answer
    with pytest.raises(TokenizerError, match="no chat template"):
        tokenizer.apply_chat_template([{"role": "user", "content": "1+1="}])


# ---------------------------------------------------------------- bad input

def test_a_folder_without_tokenizer_json_is_named(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TokenizerError, match=f"{tmp_path} has no tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="is not a folder"):
        load_tokenizer(tmp_path / "missing")


def test_a_special_token_missing_from_the_vocabulary_is_named(tmp_path):
    folder = tmp_path / "tok"
    shutil.copytree(HUGINN_TOKENIZER, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["pad_token"] = "<|no_such_token|>"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match=r"pad_token '<\|no_such_token\|>' is not in the vocabulary"):
        load_tokenizer(folder)


def test_a_template_that_fails_names_its_file_and_message(tmp_path, ours):
    folder = tmp_path / "tok"
    shutil.copytree(HUGINN_TOKENIZER, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ raise_exception('no ' + m.role + ' here') }}{% endfor %}"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    broken = load_tokenizer(folder)  # plain text still works
    assert broken.encode("x") == ours.encode("x")
    with pytest.raises(TokenizerError, match=r"tokenizer_config.json \(chat_template\) failed to render: "
                                             r"TemplateError: no user here"):
        broken.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(TokenizerError, match="chat_template argument failed to render: TemplateSyntaxError"):
        ours.apply_chat_template([{"role": "user", "content": "hi"}], chat_template="{% for %}")


@pytest.mark.parametrize("conversation, message", [
    ([{"role": "robot", "content": "hi"}], "message 0 has the unknown role 'robot'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": ["parts"]}],
     r"message 1 \(user\) has content of type list; content must be a string"),
    ([{"role": "user"}], "message 0 must be a dict with 'role' and 'content'"),
    ("hello", "a conversation is a list of messages"),
])
def test_bad_messages_are_named(ours, conversation, message):
    with pytest.raises(TokenizerError, match=message):
        ours.apply_chat_template(conversation)


def test_check_fits_names_both_numbers(ours):
    ids = ours.encode("word " * 20)
    check_fits(ids, len(ids))
    with pytest.raises(TokenizerError, match=f"the prompt has {len(ids)} tokens, more than the model's context "
                                             f"of {len(ids) - 1} tokens"):
        check_fits(ids, len(ids) - 1)
    with pytest.raises(TokenizerError, match=r"the chat has 10 tokens plus 8 new tokens \(18\), more than the "
                                             r"model's context of 16 tokens"):
        check_fits(10, 16, what="the chat", reserved=8)


def test_check_vocab_rejects_a_model_smaller_than_the_tokenizer(ours):
    check_vocab(ours, TINY.replace(vocab_size=65536))
    check_vocab(ours, TINY.replace(vocab_size=65536 + 512))  # a padded model vocabulary is fine
    with pytest.raises(TokenizerError, match=r"vocab_size=256\) is smaller than its tokenizer's \(65536 ids"):
        check_vocab(ours, TINY)
    check_vocab(load_tokenizer(EMBEDDED_MODEL), TINY)


def test_encode_rejects_non_text(ours):
    with pytest.raises(TokenizerError, match="encode takes a string, got list"):
        ours.encode(["a"])


# ---------------------------------------------------------------- the random text model of the tests

def test_the_random_text_model_loads_with_its_tokenizer_and_is_nearly_flat(text_model_dir, ours):
    """tests/text_model.py's model: loads as a Hugging Face checkpoint, its tokenizer is Huginn-0125's,
    and its next-token distribution is nearly uniform over the 65536 ids (sampling tests can fail)."""
    import jax
    import jax.numpy as jnp

    from huginn_jax.loading import load_hf_checkpoint
    from huginn_jax.model import forward
    from tests.text_model import TEXT_MODEL_CONFIG

    config, params = load_hf_checkpoint(text_model_dir)
    tokenizer = load_tokenizer(text_model_dir)
    assert config == TEXT_MODEL_CONFIG and config.vocab_size == len(tokenizer) == 65536
    check_vocab(tokenizer, config)
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert ids == ours.apply_chat_template(messages, add_generation_prompt=True)
    assert tokenizer.stop_token_ids == (65505,) and tokenizer.end_turn_token_id == 65508
    logits = forward(params, jnp.asarray([ids]), 4, config=config, key=jax.random.key(0)).logits[0]
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [T, V]
    entropy = -(jnp.exp(log_p) * log_p).sum(-1)
    assert float(entropy.min()) > 0.95 * np.log(65536)  # measured: 10.89 of 11.09 nats
    assert float(jnp.exp(log_p).max()) < 0.01           # measured: 3.4e-4 (uniform: 1.5e-5)
    assert isinstance(tokenizer.decode(jnp.argmax(logits, -1)), str)
