"""The lm-eval backend `huginn-jax` (samplers/lm_eval_backend.py) against independent truths:
log-likelihoods against a float64 log-softmax of our forward logits on each unpadded sequence,
generation against `samplers.text.complete` and the text without stop strings, and lm-eval's own
`simple_evaluate` against the evaluation runner on the embedded arithmetic model."""

from __future__ import annotations

import json

import jax
import lm_eval
import numpy as np
import pytest
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager

from huginn_jax.model import forward
from huginn_jax.tasks.arithmetic import EMBEDDED_MODEL
from huginn_jax.tasks.registry import get_task
from samplers import evaluation
from samplers.evaluation import Model, request_keys
from samplers.lm_eval_backend import TASKS_DIR, HuginnJaxLM, generation_keys, score_length
from samplers.sampling import SamplingConfig
from samplers.text import complete

NUM_STEPS = 3


@pytest.fixture(scope="module")
def model(text_model_dir) -> Model:
    return Model.load(text_model_dir)


def lm_for(model: Model, **options) -> HuginnJaxLM:
    return HuginnJaxLM(model=model, **{"num_steps": NUM_STEPS, "batch_size": 2, **options})


def instances(kind: str, arguments: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(arguments)]


NAIVE_WIDTH = 64  # every sequence of these tests fits; one compiled forward for all of them


def naive_logits(model: Model, ids: list[int]) -> np.ndarray:
    """The forward logits [len(ids), V] of this one sequence, float64, from a zero initial state
    (no randomness to match). The sequence is padded on the right to NAIVE_WIDTH, which the causal
    model never looks at, so that every call shares one compiled forward of batch 1 (a shape the
    backend never uses: it pads to a power of two and `batch_size` rows)."""
    assert len(ids) <= NAIVE_WIDTH
    padded = np.zeros((1, NAIVE_WIDTH), np.int32)
    padded[0, : len(ids)] = ids
    logits = forward(model.params, padded, NUM_STEPS, config=model.config, init_scale=0.0).logits
    return np.asarray(logits[0, : len(ids)], np.float64)


def naive_logprobs(model: Model, ids: list[int]) -> np.ndarray:
    """log p(ids[t+1] | ids[:t+1]) for every t: a float64 log-softmax of `naive_logits`."""
    x = naive_logits(model, ids[:-1])
    logz = x.max(-1) + np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1))
    return x[np.arange(len(ids) - 1), ids[1:]] - logz


PAIRS = [("The capital of France is", " Paris, a city on the Seine."),
         ("Q: What is 2 + 3?\nA:", " 5"),
         ("def add(a, b):\n    return", " a + b  # the sum of the two arguments, returned to the caller")]


def test_loglikelihood_equals_a_float64_sum_over_the_unpadded_sequence(model):
    lm = lm_for(model, init_scale=0.0)
    got = lm.loglikelihood(instances("loglikelihood", PAIRS))
    tok = model.tokenizer
    for (context, continuation), (logprob, greedy) in zip(PAIRS, got):
        whole = tok.encode(context + continuation)  # Huginn's tokenizer prepends <|begin_text|>
        n = len(whole) - len(tok.encode(context))
        want = naive_logprobs(model, whole)[-n:]
        assert n >= 1 and logprob == pytest.approx(want.sum(), rel=1e-5, abs=1e-4)
        assert greedy is False  # a flat random model's argmax is never the text
    # every batch was padded to a fixed shape: 2 rows, a power-of-two length
    assert {score_length(n, lm.max_length) for n in (7, 16, 17, 40)} == {16, 32, 64}


def test_greedy_flag(model):
    lm = lm_for(model, init_scale=0.0)
    context = model.tokenizer.encode("Greedy decoding picks")
    ids = list(context)
    for _ in range(3):  # the model's own greedy continuation, one token at a time
        ids.append(int(np.argmax(naive_logits(model, ids)[-1])))
    continuation = ids[len(context):]
    other = [continuation[0], (continuation[1] + 1) % model.config.vocab_size, continuation[2]]
    (logprob, greedy), (_, not_greedy) = lm._loglikelihood_tokens([(None, context, continuation),
                                                                  (None, context, other)])
    assert greedy is True and not_greedy is False
    assert logprob == pytest.approx(naive_logprobs(model, ids)[-3:].sum(), rel=1e-5, abs=1e-4)


def test_left_truncation(model):
    lm = lm_for(model, init_scale=0.0, max_length=12)
    tok = model.tokenizer
    context = tok.encode("A long context that certainly has more than twelve tokens in it, really.")
    continuation = tok.encode(" And more.", add_special_tokens=False)
    ((logprob, _),) = lm._loglikelihood_tokens([(None, context, continuation)])
    ids = [*context, *continuation]
    assert len(ids) > 13  # the input keeps the last max_length tokens, as HFLM
    n = len(continuation)
    assert logprob == pytest.approx(naive_logprobs(model, ids[-13:])[-n:].sum(), rel=1e-5, abs=1e-4)
    assert logprob != pytest.approx(naive_logprobs(model, ids)[-n:].sum(), rel=1e-4)


def test_loglikelihood_rolling_windows(model):
    tok = model.tokenizer
    text = "Recurrent depth lets a model think longer about harder tokens, one latent step at a time."
    ids = tok.encode(text)  # with <|begin_text|>, as HFLM's tok_encode
    whole = lm_for(model, init_scale=0.0).loglikelihood_rolling(instances("loglikelihood_rolling", [(text,)]))[0]
    assert whole == pytest.approx(naive_logprobs(model, [tok.bos_token_id, *ids]).sum(), rel=1e-5)
    windowed = lm_for(model, init_scale=0.0, max_length=8).loglikelihood_rolling(
        instances("loglikelihood_rolling", [(text,)]))[0]
    want = 0.0  # HFLM's disjoint windows: each token predicted once, with at most 8 tokens of input
    for context, continuation in map(lm_eval.utils.make_disjoint_window, lm_eval.utils.get_rolling_token_windows(
            token_list=ids, prefix_token=tok.bos_token_id, max_seq_len=8, context_len=1)):
        want += naive_logprobs(model, [*context, *continuation])[-len(continuation):].sum()
    assert len(ids) > 2 * 8 and windowed == pytest.approx(want, rel=1e-5)
    assert windowed != pytest.approx(whole, rel=1e-3)  # shorter windows do change the result


def test_random_initial_states_do_not_depend_on_padding_or_batch(model):
    lm = lm_for(model)  # random initial states (init_scale 1)
    together = lm.loglikelihood(instances("loglikelihood", PAIRS))
    alone = [lm_for(model, batch_size=1).loglikelihood(instances("loglikelihood", [p]))[0] for p in PAIRS[:2]]
    for (a, _), (b, _) in zip(together, alone):
        assert a == pytest.approx(b, rel=1e-5)
    zero = lm_for(model, init_scale=0.0).loglikelihood(instances("loglikelihood", PAIRS[:1]))[0][0]
    assert together[0][0] != pytest.approx(zero, rel=1e-6)  # the random states are used


def test_generate_until_stops_at_until_and_equals_complete(model):
    """A sampler chosen by the reference's option names (criterion: adaptive compute) with lm-eval's
    sampling options, against `complete` with that sampler, its options and the same keys, but a
    stop string that never occurs in text (of the same size, so that the same compiled program
    runs): the backend's text is that text cut before the first `until` string. Two contexts of one
    padded length, batch size 2: one compilation."""
    tok = model.tokenizer
    lm = lm_for(model, seed=3)
    contexts = ["Once upon a time", "Hello there"]
    sampling = {"do_sample": True, "temperature": 0.7, "top_p": 0.9}
    adaptive = {"criterion": "latent-diff", "exit_threshold": 0.5}
    gen_kwargs = {"until": ["e"], "max_gen_toks": 12, **sampling, **adaptive}
    options = lm._generation_options(gen_kwargs)  # adaptive exits get the latest-m4 cache
    assert options["sampler"] == "generate_with_adaptive_compute" and options["cache_lookup_strategy"] == "latest-m4"
    got = lm.generate_until(instances("generate_until", [(c, gen_kwargs) for c in contexts]))
    full = complete(model.params, tok, contexts, config=model.config, max_new_tokens=12, sampler="adaptive",
                    stop_strings=["\x01", "<|end_text|>"], num_steps=NUM_STEPS, key=request_keys(3, [0, 1]),
                    sampling=SamplingConfig(**sampling), cache_lookup_strategy="latest-m4", **adaptive).texts
    assert full[0] != full[1]  # each row its own key
    for text, whole in zip(got, full):
        assert "e" in whole and "e" not in text and text == whole.split("e")[0]
    assert {len(tok.encode(c)) for c in contexts} <= set(range(1, 9))  # one padded prompt length


def test_chat_template_as_hflm(model):
    lm = lm_for(model)
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = lm.apply_chat_template(history)
    assert text == model.tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|begin_text|>") and text.endswith("<|begin_header|>Huginn<|end_header|>\n\n")
    prefilled = lm.apply_chat_template([*history[1:], {"role": "assistant", "content": "Here is"}], False)
    assert prefilled.endswith("<|begin_header|>Huginn<|end_header|>\n\nHere is")
    assert lm.chat_template(True) == model.tokenizer.chat_template


def test_bad_model_arguments(model):
    with pytest.raises(ValueError, match="batch_size"):
        HuginnJaxLM(model=model, batch_size="auto")
    with pytest.raises(ValueError, match="num_stepz"):
        HuginnJaxLM(model=model, num_stepz=3)
    with pytest.raises(ValueError, match="pretrained"):
        HuginnJaxLM()
    with pytest.raises(ValueError, match="does not take"):
        lm_for(model).generate_until(instances("generate_until", [("Hi", {"until": ["x"], "exit_t": 0.1})]))


def test_simple_evaluate_arithmetic_equals_the_evaluation_runner(tmp_path):
    """lm-eval's own evaluator on the project's `huginn_arithmetic` task, and experiments.evaluate's
    runner on `arithmetic`, sampling (at temperature 1, where a wrong key would show): the same
    completions (each document draws from the same key), the same accuracy."""
    model = Model.load(EMBEDDED_MODEL)
    chosen = [1, 2, 3]  # prompts of one padded length: one compilation
    sampling = {"do_sample": True, "temperature": 1.0, "top_p": 1.0, "sampler": "ar"}
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)  # not lm-eval's 10k tasks
    results = lm_eval.simple_evaluate(model=HuginnJaxLM(model=model, batch_size=1, seed=7), tasks=["huginn_arithmetic"],
                                      task_manager=manager, samples={"huginn_arithmetic": chosen}, gen_kwargs=sampling,
                                      log_samples=True)
    lm_samples = {s["doc"]["doc_id"]: s["filtered_resps"][0] for s in results["samples"]["huginn_arithmetic"]}
    task = get_task("arithmetic")
    requests = evaluation.build_requests(task, task.load_docs(limit=4), model.tokenizer)[1:]
    runner = evaluation.Runner(model, evaluation.Settings(seed=7, warmup=False, progress=False))
    row = evaluation.resolve_rows(["ar"], 32, {"temperature": 1.0, "top_p": 1.0})[0]
    records = runner.run(task, requests, row, tmp_path)
    assert {r["doc_id"]: r["completion"] for r in records} == lm_samples and sorted(lm_samples) == chosen
    accuracy = sum(r["correct"] for r in records) / len(chosen)
    assert results["results"]["huginn_arithmetic"]["exact_match,none"] == pytest.approx(accuracy)
    assert accuracy > 0  # the trained model answers


def test_generation_keys_follow_documents_and_repeats():
    requests = [Instance("generate_until", {}, ("a", {}), 0, metadata=("t", 5, 2)),
                Instance("generate_until", {}, ("a", {}), 0, metadata=("t", 5, 2)),  # a repeat
                Instance("generate_until", {}, ("b", {}), 0, metadata=("u", 5, 1)),
                Instance("generate_until", {}, ("c", {}), 0)]  # no document: its position
    data = np.asarray(jax.random.key_data(generation_keys(9, requests)))
    first = np.asarray(jax.random.key_data(request_keys(9, [5, 3])))
    assert (data[0] == first[0]).all() and (data[2] == first[0]).all() and (data[3] == first[1]).all()
    assert (data[1] != data[0]).any()


def test_simple_evaluate_multiple_choice_over_local_data(model, tmp_path, monkeypatch):
    """A multiple-choice lm-eval task over a local JSON lines file (the --include_path route):
    lm-eval's accuracy equals picking, per document, the choice of highest log-likelihood."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    docs = [{"question": "The sky is", "choices": ["blue", "a potato", "loud"], "label": 0},
            {"question": "Two plus two is", "choices": ["four", "seven"], "label": 0},
            {"question": "Water is", "choices": ["dry", "wet", "square"], "label": 1}]
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n"
        f"  data_files:\n    test: {data}\n  cache_dir: {tmp_path / 'cache'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\nmetadata:\n  version: 1.0\n")
    lm = lm_for(model, batch_size=4)
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    results = lm_eval.simple_evaluate(model=lm, tasks=["tiny_mc"], task_manager=manager)
    picks = []
    for d in docs:
        # lm-eval's request: the choice after its target delimiter, a space
        scores = lm.loglikelihood(instances("loglikelihood", [(d["question"], " " + c) for c in d["choices"]]))
        picks.append(int(np.argmax([s for s, _ in scores])) == d["label"])
    assert results["results"]["tiny_mc"]["acc,none"] == pytest.approx(np.mean(picks))
