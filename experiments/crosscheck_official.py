"""Checks that the official PyTorch implementation loads an exported huginn-jax model and, with
deterministic settings, decodes exactly what huginn-jax decodes.

Outside the test suite: the official code is not part of the project. The model is exported with
the converter's command line (`python -m convert export`) into a Hugging Face folder, loaded with
the official `RavenForCausalLM.from_pretrained`, and both implementations answer held-out problems
greedily from a zero initial state (`init_scale=0`) with static AR and the diffusion sampler's
paper settings. Every generated token is compared, the end token included, not only the answer.

    python -m experiments.crosscheck_official --reference_dir=/path/to/recurrent-pretraining/recpre
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from absl import app, flags, logging
from tqdm import tqdm

from experiments.common import load_task_model, quiet_jax_logs
from experiments.reference_model import PACKAGE, import_reference
from huginn_jax.tasks.arithmetic import EMBEDDED_MODEL, heldout_problems, score
from samplers import generate_diffusion_style, generate_minimal
from samplers.diffusion import PRESETS

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", str(EMBEDDED_MODEL), "A converted arithmetic-task checkpoint with tokenizer.json.")
flags.DEFINE_string("reference_dir", None, "The recpre/ folder of seal-rg/recurrent-pretraining.", required=True)
flags.DEFINE_integer("problems", 100, "Held-out problems to compare.")
flags.DEFINE_integer("num_steps", 32, "Recurrence of static AR and of the diffusion prefill.")
flags.DEFINE_integer("max_new_tokens", 10, "Most tokens per answer (huginn-jax stops at the end token).")
flags.DEFINE_string("output", "benchmarks/arithmetic_official_crosscheck.json", "Where the summary goes.")


def export(checkpoint: str, folder: Path) -> Path:
    """The converter's command line, as a user runs it."""
    out = folder / "hf"
    run = subprocess.run([sys.executable, "-m", "convert", "export", f"--source={checkpoint}", f"--output={out}",
                          "--dtype=float32"], capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"export failed:\n{run.stderr[-3000:]}")
    return out


def official_model(reference_dir: str, folder: Path):
    import importlib

    module = import_reference(reference_dir)
    config_module = importlib.import_module(f"{PACKAGE}.raven_config_minimal")
    config = config_module.RavenConfig.from_pretrained(folder)
    return module.RavenForCausalLM.from_pretrained(folder, config=config).float().eval()


def main(argv: list[str]) -> None:
    del argv
    quiet_jax_logs()
    import torch
    from transformers import GenerationConfig

    config, params, tokenizer = load_task_model(FLAGS.checkpoint)
    problems = list(heldout_problems()[: FLAGS.problems])
    with tempfile.TemporaryDirectory() as tmp:
        folder = export(FLAGS.checkpoint, Path(tmp))
        model = official_model(FLAGS.reference_dir, folder)
    logging.info("official RavenForCausalLM loaded the export: %d parameters",
                 sum(p.numel() for p in model.parameters()))

    settings = {"static AR": (generate_minimal, "generate_minimal", {}),
                **{f"diffusion {name}": (generate_diffusion_style, "generate_diffusion_style", dict(options))
                   for name, options in PRESETS.items()}}
    results = {name: {"identical": 0, "ours_correct": 0, "official_correct": 0, "mismatches": []} for name in settings}
    for problem in tqdm(problems, desc="official vs huginn-jax", unit="problem"):
        prompt = tokenizer.encode_prompt(problem)
        ids = torch.tensor([prompt], dtype=torch.long)
        for name, (ours, official, options) in settings.items():
            common = dict(num_steps=FLAGS.num_steps, init_scale=0.0, **options)
            mine = ours(params, [prompt], config=config, max_new_tokens=FLAGS.max_new_tokens,
                        stop_token_ids=[tokenizer.end_id], **common).sequences()[0]
            # The official samplers do not stop at our end token (the diffusion sampler checks stops only
            # after num_steps steps), and past it the model writes text it was never trained on: they
            # generate as many tokens as huginn-jax did. The official diffusion sampler freezes a token
            # only once the latent of the position reading it converges, which for the end token (never
            # read in training) need not happen, so there the answer before the end token is compared.
            if "diffusion" in name and mine[-1:] == [tokenizer.end_id]:
                mine = mine[:-1]
            with torch.no_grad():
                theirs = getattr(model, official)(ids, GenerationConfig(do_sample=False, max_new_tokens=len(mine)),
                                                  max_new_tokens=len(mine), **common)
            theirs = theirs[0, len(prompt): len(prompt) + len(mine)].tolist()
            r = results[name]
            r["identical"] += mine == theirs
            r["ours_correct"] += score(tokenizer.decode(mine), problem)  # (cut at the end token if any)
            r["official_correct"] += score(tokenizer.decode(theirs), problem)
            if mine != theirs:
                r["mismatches"].append({"problem": problem.prompt, "huginn_jax": mine, "official": theirs})
    summary = {"checkpoint": FLAGS.checkpoint, "problems": len(problems), "num_steps": FLAGS.num_steps,
               "max_new_tokens": FLAGS.max_new_tokens, "init_scale": 0.0, "results": results,
               "command": "python -m experiments.crosscheck_official --reference_dir=.../recpre "
                          f"--problems={FLAGS.problems} --num_steps={FLAGS.num_steps}"}
    Path(FLAGS.output).parent.mkdir(parents=True, exist_ok=True)
    Path(FLAGS.output).write_text(json.dumps(summary, indent=2) + "\n")
    for name, r in results.items():
        print(f"{name:>22}: {r['identical']}/{len(problems)} identical token sequences; accuracy huginn-jax "
              f"{r['ours_correct']}/{len(problems)}, official {r['official_correct']}/{len(problems)}")
    if any(r["mismatches"] for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
