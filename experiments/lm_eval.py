"""lm-evaluation-harness's own command line with huginn-jax registered as the model `huginn-jax`.

    HF_DATASETS_OFFLINE=1 python -m experiments.lm_eval --model huginn-jax \\
        --model_args pretrained=ckpt/huginn-0125,num_steps=32,dtype=bfloat16 --batch_size 8 \\
        --tasks gsm8k_cot --apply_chat_template --fewshot_as_multiturn \\
        --system_instruction="You are a helpful assistant that can assist users with mathematical reasoning."
    python -m experiments.lm_eval --model huginn-jax --model_args pretrained=huginn_jax/assets/arithmetic-tiny \\
        --tasks huginn_arithmetic --gen_kwargs sampler=diffusion,inner_recurrence=4,state_noise_mixing=0

Every argument is lm-eval's (`lm-eval run --help`); samplers and their options go into --gen_kwargs
by the reference's names (see samplers/lm_eval_backend.py). Without --include_path, the project's
own tasks (samplers/lm_eval_tasks: `huginn_arithmetic`) are included; with it, lm-eval reads yours
(local data: a yaml with `dataset_path: json` and `data_files`, and HF_DATASETS_OFFLINE=1).
"""

from __future__ import annotations

import sys

from absl import flags

from huginn_jax import cli


def with_project_tasks(argv: list[str]) -> list[str]:
    """argv with --include_path=<the project's lm-eval tasks> unless one is given."""
    from samplers.lm_eval_backend import TASKS_DIR

    given = any(a == "--include_path" or a.startswith("--include_path=") for a in argv[1:])
    running = len(argv) > 1 and argv[1] not in ("ls", "validate", "-h", "--help")
    return argv if given or not running else [*argv, f"--include_path={TASKS_DIR}"]


def lm_eval_arguments(argv: list[str]) -> list[str]:
    """absl's flag parsing step: it must mark its flags parsed; every argument is lm-eval's."""
    flags.FLAGS(argv[:1])
    return argv


def main(argv: list[str]) -> None:
    import samplers.lm_eval_backend  # noqa: F401  (registers the model "huginn-jax")
    from lm_eval.__main__ import cli_evaluate

    sys.argv = with_project_tasks(list(argv))
    cli_evaluate()


if __name__ == "__main__":
    cli.run(main, flags_parser=lm_eval_arguments)
