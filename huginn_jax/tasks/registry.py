"""The evaluation tasks by name (the evaluate CLI's --tasks)."""

from __future__ import annotations

from huginn_jax.tasks import sandbox
from huginn_jax.tasks.arithmetic_eval import Arithmetic
from huginn_jax.tasks.base import Task
from huginn_jax.tasks.gsm8k import GSM8KCoT
from huginn_jax.tasks.humaneval import HumanEval
from huginn_jax.tasks.math500 import MATH500
from huginn_jax.tasks.mbpp import MBPP

TASK_NAMES = ("gsm8k_cot", "math500", "humaneval", "mbpp", "arithmetic")
# How the paper's Table 1 names the columns.
DISPLAY_NAMES = {"gsm8k_cot": "GSM8K", "math500": "MATH500", "humaneval": "HumanEval",
                 "mbpp": "MBPP", "arithmetic": "Arithmetic"}


def get_task(name: str, limits: sandbox.Limits | None = None, workers: int | None = None) -> Task:
    """The task called `name`; `limits` and `workers` configure the code tasks' sandbox."""
    code_options = {k: v for k, v in (("limits", limits), ("workers", workers)) if v is not None}
    tasks = {"gsm8k_cot": GSM8KCoT, "math500": MATH500, "humaneval": HumanEval, "mbpp": MBPP,
             "arithmetic": Arithmetic}
    if name not in tasks:
        raise ValueError(f"unknown task {name!r}; the tasks are {', '.join(TASK_NAMES)}")
    return tasks[name](**code_options) if name in ("humaneval", "mbpp") else tasks[name]()
