"""The analytic roofline of every sampler step (`huginn_jax.roofline`): weight and cache bytes per
step and the tokens/s bound on one A100-40GB, H100, H200 and TPU v5e at batch 1 and 32, for the
steps a TPU plan projects (`samplers.plan.sampler_steps`: prefill, static AR, adaptive AR, a
self-speculative round, diffusion steps), with the embedded arithmetic model's rates.

    python -m experiments.roofline_table [--profile=huginn-0125] [--context=1024]
"""

from __future__ import annotations

import jax.numpy as jnp
from absl import flags

from huginn_jax import cli, roofline
from huginn_jax.config import PRESETS, preset
from samplers import plan

FLAGS = flags.FLAGS
flags.DEFINE_enum("profile", "huginn-0125", sorted(PRESETS), "The model shape.")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Parameter and cache dtype.")
flags.DEFINE_integer("context", 1024, "Cache positions every step reads.")
flags.DEFINE_integer("prompt_tokens", 128, "Prompt length of the prefill.")
flags.DEFINE_list("chips", ["A100-40GB", "H100", "H200", "v5e"], "Chips (huginn_jax.roofline.CHIPS).")


def main(argv: list[str]) -> None:
    unknown = sorted(set(FLAGS.chips) - set(roofline.CHIPS))
    if unknown:
        raise cli.UsageError(f"--chips: unknown {unknown}; choose from {', '.join(roofline.CHIPS)}")
    config = preset(FLAGS.profile)
    try:
        settings = plan.PlanSettings(config, jnp.dtype(FLAGS.dtype), prompt_tokens=FLAGS.prompt_tokens,
                                     context=FLAGS.context).check()
    except plan.PlanError as err:
        raise cli.UsageError(str(err)) from None
    rates = plan.Rates(**plan.EMBEDDED_RATES, source="the embedded arithmetic model")
    steps = plan.sampler_steps(settings, rates)
    print(f"{FLAGS.profile}, {FLAGS.dtype}, {roofline.format_bytes(roofline.weight_bytes(config, settings.dtype))} "
          f"of weights; every step reads a cache of {FLAGS.context} positions; rates: {rates.source} "
          f"({', '.join(f'{k}={v}' for k, v in plan.EMBEDDED_RATES.items())})\n")
    print(roofline.bound_table(config, settings.dtype, steps, list(FLAGS.chips)))


if __name__ == "__main__":
    cli.run(main)
