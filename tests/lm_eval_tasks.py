"""lm-evaluation-harness's own tasks, pointed at the committed data subsets (for the task tests).

`local_task(name, data_file, tmp_path)` writes an --include_path yaml that includes lm-eval's
installed task yaml and replaces only its data source with the local JSON lines file, then loads
it with lm-eval's TaskManager (no network: `dataset_path: json`). `hf_chat_template(tokenizer)` is
lm-eval's HFLM.apply_chat_template bound to a transformers tokenizer, the callable lm-eval renders
chat prompts with (its code, run without importing lm-eval's HF model module).
"""

from __future__ import annotations

import ast
import logging
import types
from pathlib import Path

import jinja2

import evaluate
import lm_eval
from lm_eval.tasks import TaskManager

REPO = Path(__file__).resolve().parents[1]
SUBSET = REPO / "tests" / "fixtures" / "eval-data-subset"
TOKENIZER = REPO / "tests" / "fixtures" / "huginn-0125-tokenizer"
LM_EVAL_TASKS = Path(lm_eval.__file__).parent / "tasks"
YAMLS = {"gsm8k_cot": "gsm8k/gsm8k-cot.yaml", "humaneval": "humaneval/humaneval.yaml",
         "humaneval_instruct": "humaneval/humaneval_instruct.yaml", "mbpp": "mbpp/mbpp.yaml"}


class _NoCodeEval:
    """Stands in for `evaluate.load("code_eval")`, which lm-eval's code task modules call on
    import (it downloads a metric script); these tests run programs in our own sandbox."""

    def compute(self, references, predictions, k):
        return {f"pass@{i}": 0.0 for i in k}, {}


def local_task(name: str, data_file: Path, tmp_path: Path, monkeypatch):
    """lm-eval's task `name` with its test split read from `data_file`."""
    monkeypatch.setattr(evaluate, "load", lambda *args, **kwargs: _NoCodeEval())
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    folder = tmp_path / f"lm_eval_{name}"
    folder.mkdir()
    (folder / f"{name}_local.yaml").write_text(
        f"include: {LM_EVAL_TASKS / YAMLS[name]}\n"
        f"task: {name}_local\n"
        "dataset_path: json\n"
        "dataset_name: null\n"
        "dataset_kwargs:\n"
        f"  data_files:\n    test: {data_file}\n"
        f"  cache_dir: {tmp_path / 'datasets_cache'}\n")
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    return manager.load([f"{name}_local"])["tasks"][f"{name}_local"]


def hf_chat_template(tokenizer):
    """lm-eval's HFLM.apply_chat_template(chat_history, add_generation_prompt) on `tokenizer`.

    The method's own code, taken from lm_eval/models/huggingface.py with `ast` and run on a
    stand-in model: importing that module needs `accelerate` (lm-eval's [hf] extra), which this
    project does not install."""
    source = (Path(lm_eval.__file__).parent / "models" / "huggingface.py").read_text()
    hflm = next(node for node in ast.parse(source).body
                if isinstance(node, ast.ClassDef) and node.name == "HFLM")
    method = next(node for node in hflm.body
                  if isinstance(node, ast.FunctionDef) and node.name == "apply_chat_template")
    namespace = {"jinja2": jinja2, "eval_logger": logging.getLogger("lm_eval")}
    exec(compile(ast.Module(body=[method], type_ignores=[]), "huggingface.py", "exec"), namespace)
    model = types.SimpleNamespace(tokenizer=tokenizer, chat_template_args={})
    return lambda history, add_generation_prompt=True: namespace["apply_chat_template"](
        model, history, add_generation_prompt=add_generation_prompt)
