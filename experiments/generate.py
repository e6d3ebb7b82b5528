"""Generates from a Huginn checkpoint with the static-depth AR sampler, streaming token ids.

With no flags it runs the tiny reference checkpoint that ships with the repository (no download):

    python -m experiments.generate
    python -m experiments.generate --checkpoint=/path/to/hf_or_converted_folder --prompt_ids=1,2,3 --num_steps=32
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments.common import DEFAULT_FIXTURE, load_checkpoint, quiet_jax_logs
from samplers import SamplingConfig, generate_minimal

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", str(DEFAULT_FIXTURE / "checkpoint"),
                    "A Hugging Face layout folder or a converted (python -m convert) checkpoint.")
flags.DEFINE_list("prompt_ids", ["148", "63", "149", "65", "196", "220", "117", "146", "68", "144", "125", "78"],
                  "Prompt token ids (default: the reference fixture's generation prompt).")
flags.DEFINE_integer("max_new_tokens", 24, "Tokens to generate.")
flags.DEFINE_integer("num_steps", None, "Recurrence steps per token (default: the model's mean_recurrence).")
flags.DEFINE_float("init_scale", 1.0, "Scale of the random initial latent state (0: start from zeros).")
flags.DEFINE_enum("cache_lookup_strategy", "full", ["full", "latest-m4-compress-s4"], "KV cache strategy.")
flags.DEFINE_bool("do_sample", False, "Sample instead of greedy decoding.")
flags.DEFINE_float("temperature", 1.0, "Sampling temperature.")
flags.DEFINE_integer("top_k", 50, "Top-k filter when sampling (0: off).")
flags.DEFINE_float("top_p", 1.0, "Top-p filter when sampling (1: off).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter dtype.")
flags.DEFINE_integer("seed", 0, "PRNG seed of the initial states and of sampling.")


def main(argv: list[str]) -> None:
    del argv
    quiet_jax_logs()
    config, params = load_checkpoint(FLAGS.checkpoint, jnp.dtype(FLAGS.dtype))
    prompt = np.asarray([[int(t) for t in FLAGS.prompt_ids]], np.int32)
    num_steps = FLAGS.num_steps or config.mean_recurrence
    print(f"model: width {config.n_embd}, {config.n_layers_in_prelude}/{config.n_layers_in_recurrent_block}/"
          f"{config.n_layers_in_coda} layers, vocab {config.vocab_size}; {num_steps} recurrence steps per token")
    print(f"prompt: {prompt[0].tolist()}")
    options = dict(config=config, max_new_tokens=FLAGS.max_new_tokens, num_steps=num_steps,
                   init_scale=FLAGS.init_scale, cache_lookup_strategy=FLAGS.cache_lookup_strategy,
                   sampling=SamplingConfig(do_sample=FLAGS.do_sample, temperature=FLAGS.temperature,
                                           top_k=FLAGS.top_k, top_p=FLAGS.top_p),
                   key=jax.random.key(FLAGS.seed))
    print("generated:", end="", flush=True)
    out = generate_minimal(params, prompt, streamer=lambda tokens, active: print(
        f" {tokens[0]}" if active[0] else "", end="", flush=True), **options)
    print()
    generate_minimal(params, prompt, **options)  # compiles the variant without streaming
    start = time.perf_counter()
    again = generate_minimal(params, prompt, **options)
    seconds = time.perf_counter() - start
    assert again.sequences() == out.sequences()
    print(f"{int(out.lengths[0])} tokens, {out.recurrence_steps[0].sum()} core steps, "
          f"{out.lengths[0] / seconds:.1f} tokens/s ({jax.devices()[0].platform}, after compilation)")


if __name__ == "__main__":
    app.run(main)
