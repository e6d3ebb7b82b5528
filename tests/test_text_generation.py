"""Text in, text out on a random model with the real Huginn-0125 tokenizer: stop strings stop every
sampler during generation (checked against a search in the decoded text), text streams through
every sampler, chats go through the chat template, and a streamer's exception comes back as is."""

import functools

import jax
import pytest

from huginn_jax.loading import load_hf_checkpoint
from huginn_jax.tokenizer import load_tokenizer
from samplers import SamplingConfig
from samplers.text import TextStreamer, chat, complete, end_token_ids

SAMPLERS = {
    "ar": dict(num_steps=2),
    "adaptive": dict(num_steps=3, criterion="latent-diff", exit_threshold=0.2, cache_lookup_strategy="latest-m4"),
    "speculative": dict(num_steps=2, draft_steps=1, lookahead_for_draft=3),
    "diffusion": dict(num_steps=2, inner_recurrence=1, freeze_strategy="fixed", max_wavefront=8),
}
PROMPTS = ["Q: What is the capital of France?\nA:", "def add(a, b):", "Hello"]
NEW_TOKENS = 16
HOT = SamplingConfig(do_sample=True, temperature=1.0, top_k=0)


@pytest.fixture(scope="module")
def text_model(text_model_dir):
    config, params = load_hf_checkpoint(text_model_dir)
    return config, params, load_tokenizer(text_model_dir)


def run(text_model, name, **options):
    config, params, tokenizer = text_model
    options = {"max_new_tokens": NEW_TOKENS, "sampling": HOT, "init_scale": 0.0,
               "key": jax.random.split(jax.random.key(1), len(PROMPTS)), **SAMPLERS[name], **options}
    return complete(params, tokenizer, PROMPTS, config=config, sampler=name, **options)


@functools.lru_cache(maxsize=None)
def raw_texts(tokenizer, row: tuple[int, ...]) -> list[str]:
    """The raw text (no clean-up, special tokens as text) after each token of a row."""
    return [tokenizer.decode(row[: i + 1], clean_up_tokenization_spaces=False) for i in range(len(row))]


def expected_stop(tokenizer, row: list[int], stop: str) -> int:
    """Tokens a row keeps with `stop` as a stop string: up to the first whose text completes it."""
    texts = raw_texts(tokenizer, tuple(row))
    return next((i + 1 for i, text in enumerate(texts) if stop in text), len(row))


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_stop_strings_stop_each_row_where_its_text_first_holds_them(text_model, name):
    tokenizer = text_model[2]
    free = run(text_model, name)
    rows = free.output.sequences()
    assert all(len(r) == NEW_TOKENS for r in rows)  # no end token by chance: the free run is complete
    # a stop string across the boundary of tokens 5 and 6 of row 0 (and maybe elsewhere)
    pieces = [tokenizer.decode([t], clean_up_tokenization_spaces=False) for t in rows[0]]
    stop = pieces[4][-2:] + pieces[5][:1]
    stopped = run(text_model, name, stop_strings=[stop])
    for i, row in enumerate(rows):
        keep = expected_stop(tokenizer, row, stop)
        assert stopped.output.sequences()[i] == row[:keep], f"row {i}"
        text = tokenizer.decode(row, skip_special_tokens=True)
        assert stopped.texts[i] == (text[: text.index(stop)] if stop in text else text)
    assert stopped.output.lengths[0] <= 6


@pytest.mark.parametrize("name", ["ar", "speculative", "diffusion"])
def test_generation_ends_when_every_row_has_stopped(text_model, name):
    tokenizer = text_model[2]
    rows = run(text_model, name).output.sequences()
    # each row's own second token is a stop token: every row stops after two tokens
    calls = []
    out = run(text_model, name, stop_token_ids=sorted({row[1] for row in rows}),
              streamer=lambda new: calls.append([len(t) for t in new]))
    assert all(n <= 2 for n in out.output.lengths)
    assert sum(1 for c in calls if any(c)) <= 2 * len(PROMPTS)  # no step after the last stop
    assert tokenizer is text_model[2]


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_text_streams_through_every_sampler(text_model, name):
    streamer = TextStreamer(text_model[2], row=None, write=lambda row, text: None)
    out = run(text_model, name, streamer=streamer)
    assert streamer.texts == out.texts
    assert all(streamer.texts)


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("error", [ValueError("the streamer broke"), KeyboardInterrupt()])
def test_an_exception_of_the_streamer_comes_back_as_it_was_raised(text_model, name, error):
    calls = []

    def streamer(new):
        calls.append(new)
        if len(calls) == 3:
            raise error

    with pytest.raises(type(error)) as raised:
        run(text_model, name, streamer=streamer)
    assert raised.value is error
    assert len(calls) == 3  # decoding stopped at the next step


def test_a_chat_goes_through_the_template_with_the_generation_prompt(text_model):
    config, params, tokenizer = text_model
    conversation = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"}]
    out = chat(params, tokenizer, [conversation], config=config, max_new_tokens=4, num_steps=2, init_scale=0.0)
    want = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
    assert out.prompt_ids == [want]
    assert out.prompts[0] == tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    assert out.texts[0] == tokenizer.decode(out.output.sequences()[0], skip_special_tokens=True)


def test_text_generation_stops_at_the_end_of_turn_and_text_tokens(text_model):
    tokenizer = text_model[2]
    assert set(end_token_ids(tokenizer)) == {65504, 65505, 65508}


def test_bad_text_input_is_named(text_model):
    config, params, tokenizer = text_model
    with pytest.raises(ValueError, match="prompts must be a list of strings"):
        complete(params, tokenizer, "a single string", config=config, max_new_tokens=2)
    with pytest.raises(ValueError, match="stop string 0 is a int"):
        complete(params, tokenizer, ["x"], config=config, max_new_tokens=2, stop_strings=[3])
    with pytest.raises(ValueError, match="stop string"):
        complete(params, tokenizer, ["x"], config=config, max_new_tokens=2, stop_strings=[""])
    with pytest.raises(ValueError, match="more than the model's context of 512"):
        complete(params, tokenizer, ["word " * 600], config=config, max_new_tokens=2)
    with pytest.raises(ValueError, match="unknown role"):
        chat(params, tokenizer, [[{"role": "wizard", "content": "x"}]], config=config, max_new_tokens=2)
