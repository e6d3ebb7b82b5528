"""Trains a Huginn model on the arithmetic task with Huginn's recipe, from a laptop to a TPU pod.

Randomized unrolling with truncated backprop (`huginn_jax.training`), AdamW with warm-up, cosine
decay and clipping, float32 or bfloat16 compute, data parallelism over every device (each process
feeds its share of the global batch) or, with `--mesh=DATA,MODEL`, data x tensor parallelism
(heads, MLP and vocabulary split over MODEL devices: `huginn_jax.sharding`), Orbax checkpoints
that a rerun with the same `--output_dir` resumes from, a progress bar, a metrics log
(`metrics.jsonl`) and a loss-curve plot. At the end the model is written as a converted
checkpoint with its tokenizer (`OUTPUT_DIR/model`), ready for `python -m experiments.generate
--checkpoint=...` and `python -m convert export`.

The embedded model (huginn_jax/assets/arithmetic-tiny) was trained with the defaults:

    python -m experiments.train --output_dir=runs/arithmetic
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import app, flags

from experiments.common import pyplot, quiet_jax_logs
from huginn_jax import checkpoint as converted
from huginn_jax import sharding
from huginn_jax.config import HuginnConfig
from huginn_jax.model import forward
from huginn_jax.params import count_params, init_params
from huginn_jax.tasks import arithmetic
from huginn_jax.training import OptimizerConfig, init_train_state, sample_recurrence, train_step

FLAGS = flags.FLAGS
flags.DEFINE_string("output_dir", "runs/arithmetic", "Checkpoints, metrics, plot and the final model go here; "
                    "rerunning with the same folder resumes.")
# model
flags.DEFINE_integer("n_embd", 192, "Width.")
flags.DEFINE_integer("n_heads", 6, "Attention heads.")
flags.DEFINE_integer("intermediate_size", 512, "MLP width.")
flags.DEFINE_integer("n_layers_in_prelude", 1, "Prelude layers.")
flags.DEFINE_integer("n_layers_in_recurrent_block", 2, "Core layers, repeated r times.")
flags.DEFINE_integer("n_layers_in_coda", 1, "Coda layers.")
flags.DEFINE_integer("mean_recurrence", 16, "Mean of the randomized recurrence count.")
flags.DEFINE_integer("mean_backprop_depth", 4, "Recurrence steps with gradient (truncated backprop).")
# optimization
flags.DEFINE_integer("steps", 3000, "Optimizer steps.")
flags.DEFINE_integer("batch_size", 64, "Global batch size (sequences), split over all devices.")
flags.DEFINE_float("learning_rate", 1e-3, "Peak learning rate.")
flags.DEFINE_integer("warmup_steps", 200, "Linear warm-up steps.")
flags.DEFINE_float("final_lr_fraction", 0.1, "Cosine decay ends at this fraction of the peak.")
flags.DEFINE_float("weight_decay", 0.1, "AdamW decoupled weight decay (matrices only).")
flags.DEFINE_float("clip_norm", 1.0, "Global gradient-norm clipping.")
flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16"], "Forward/backward dtype (weights stay float32).")
flags.DEFINE_bool("remat", True, "Recompute each recurrence step in the backward pass (less memory).")
flags.DEFINE_integer("seed", 0, "Seed of the initialization, the data order and the recurrence draws.")
# bookkeeping
flags.DEFINE_integer("log_every", 25, "Steps between metric records.")
flags.DEFINE_integer("eval_every", 250, "Steps between held-out evaluations (teacher-forced, r = mean_recurrence).")
flags.DEFINE_integer("checkpoint_every", 250, "Steps between Orbax checkpoints.")
flags.DEFINE_integer("keep_checkpoints", 2, "Checkpoints kept.")
flags.DEFINE_string("mesh", "", "DATA,MODEL devices (e.g. 2,4; all devices): the batch split over DATA, heads, MLP "
                    "and vocabulary over MODEL (which must divide --n_heads). Empty: every device on DATA.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first: one process per host of a "
                  "multi-host TPU pod or GPU cluster (each feeds its share of the batch).")

# Changing any of these makes an existing run a different run: resuming it is refused.
RUN_FLAGS = ("n_embd", "n_heads", "intermediate_size", "n_layers_in_prelude", "n_layers_in_recurrent_block",
             "n_layers_in_coda", "mean_recurrence", "mean_backprop_depth", "steps", "batch_size", "learning_rate",
             "warmup_steps", "final_lr_fraction", "weight_decay", "clip_norm", "compute_dtype", "seed")
TEXT_LENGTH = arithmetic.max_text_tokens()
EVAL_PROBLEMS = 512


def model_config() -> HuginnConfig:
    vocab = -(-len(arithmetic.VOCAB) // 64) * 64  # padded like Huginn's vocabulary
    return HuginnConfig(n_embd=FLAGS.n_embd, n_heads=FLAGS.n_heads, num_key_value_heads=FLAGS.n_heads,
                        intermediate_size=FLAGS.intermediate_size, vocab_size=vocab,
                        n_layers_in_prelude=FLAGS.n_layers_in_prelude,
                        n_layers_in_recurrent_block=FLAGS.n_layers_in_recurrent_block,
                        n_layers_in_coda=FLAGS.n_layers_in_coda, block_size=256,
                        mean_recurrence=FLAGS.mean_recurrence, mean_backprop_depth=FLAGS.mean_backprop_depth)


def check_resumable(output_dir: Path, run: dict) -> None:
    """Writes the run description, or refuses to resume a folder that holds a different run."""
    path = output_dir / "run.json"
    if path.exists():
        previous = json.loads(path.read_text())
        changed = {k: (previous.get(k), v) for k, v in run.items() if previous.get(k) != v}
        if changed:
            raise app.UsageError(f"{output_dir} holds a different run; changed flags (was, now): {changed}. "
                                 "Use another --output_dir.")
    else:
        output_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(run, indent=2) + "\n")


def local_batch(tokenizer: arithmetic.TaskTokenizer, step: int) -> tuple[np.ndarray, np.ndarray]:
    """This process's rows of the global batch of `step` (a pure function of seed and step)."""
    problems = arithmetic.training_problems(FLAGS.seed, step, FLAGS.batch_size)
    per_process = FLAGS.batch_size // jax.process_count()
    mine = problems[jax.process_index() * per_process: (jax.process_index() + 1) * per_process]
    return tokenizer.training_batch(mine, TEXT_LENGTH)


def heldout_eval(params: dict, config: HuginnConfig, tokenizer: arithmetic.TaskTokenizer, key: jax.Array,
                 mesh: jax.sharding.Mesh | None = None) -> dict:
    """Teacher-forced held-out metrics at r = mean_recurrence: answer-token accuracy, and the share of
    problems whose every answer token is the argmax (what greedy decoding would get right)."""
    problems = arithmetic.heldout_problems()[:EVAL_PROBLEMS]
    tokens, mask = tokenizer.training_batch(problems, TEXT_LENGTH)
    logits = forward(params, tokens, config.mean_recurrence, config=config, key=key, mesh=mesh).logits
    correct = np.asarray(jnp.argmax(logits, -1)) == np.roll(tokens, -1, axis=1)
    token_accuracy = float((correct * mask).sum() / mask.sum())
    exact = float(np.mean(np.all(correct | (mask == 0), axis=1)))
    return {"heldout_token_accuracy": token_accuracy, "heldout_exact": exact}


def plot_loss_curve(records: list[dict], path: Path) -> None:
    try:
        plt = pyplot()
    except ImportError:
        logging.warning("matplotlib is not installed (pip install -e '.[plots]'): no loss-curve plot")
        return
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "heldout_exact" in r]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1)
    left.set(xlabel="step", ylabel="training loss (answer tokens)", yscale="log", title="loss")
    right.plot([r["step"] for r in evals], [r["heldout_exact"] for r in evals], "o-", label="held-out exact")
    right.plot([r["step"] for r in evals], [r["heldout_token_accuracy"] for r in evals], "s--", label="held-out token")
    right.set(xlabel="step", ylabel="accuracy", ylim=(0, 1.02), title="held-out (teacher-forced, r = mean)")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> None:
    del argv
    quiet_jax_logs()
    if FLAGS.distributed:
        jax.distributed.initialize()
    output_dir = Path(FLAGS.output_dir).absolute()
    devices = jax.device_count()
    try:
        data, model = sharding.parse_mesh(FLAGS.mesh) or (devices, 1)
    except ValueError as err:
        raise app.UsageError(str(err)) from None
    if data * model != devices:
        raise app.UsageError(f"--mesh={data},{model} must use all {devices} devices (DATA x MODEL = {devices})")
    if FLAGS.batch_size % data:
        raise app.UsageError(f"--batch_size={FLAGS.batch_size} must be a multiple of the mesh's {data} groups of rows")
    config = model_config()
    mesh = sharding.make_mesh((data, model))
    if sharding.head_padding(config, mesh):
        raise app.UsageError(f"--mesh={data},{model}: the model axis of {model} devices must divide --n_heads="
                             f"{config.n_heads} (training does not pad heads)")
    run = {name: FLAGS[name].value for name in RUN_FLAGS}
    check_resumable(output_dir, run)

    tokenizer = arithmetic.TaskTokenizer(arithmetic.build_tokenizer())
    optimizer_config = OptimizerConfig(learning_rate=FLAGS.learning_rate, warmup_steps=FLAGS.warmup_steps,
                                       total_steps=FLAGS.steps, final_lr_fraction=FLAGS.final_lr_fraction,
                                       weight_decay=FLAGS.weight_decay, clip_norm=FLAGS.clip_norm)
    optimizer = optimizer_config.build()
    batch_sharding = sharding.batch_sharding(mesh, 2)

    def initial(key: jax.Array):
        return init_train_state(init_params(config, key), optimizer)

    key = jax.random.key(FLAGS.seed)
    # parameters and Adam's moments by the sharding rules, step counts replicated
    init = jax.jit(initial, out_shardings=sharding.shardings_like_params(jax.eval_shape(initial, key), config, mesh))
    state = init(key)
    manager = ocp.CheckpointManager(output_dir / "checkpoints", options=ocp.CheckpointManagerOptions(
        max_to_keep=FLAGS.keep_checkpoints, create=True))
    metrics_path = output_dir / "metrics.jsonl"
    records: list[dict] = []
    if manager.latest_step() is not None:
        start = manager.latest_step()
        state = manager.restore(start, args=ocp.args.StandardRestore(state))
        if metrics_path.exists():
            records = [r for r in map(json.loads, metrics_path.read_text().splitlines()) if r["step"] <= start]
        logging.info("resuming %s from step %d", output_dir, start)
    chief = jax.process_index() == 0  # the one process that writes logs, plot and model
    if chief:
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    start = int(state.step)
    logging.info("%s: %d parameters, %d devices, global batch %d, steps %d..%d", config, count_params(config),
                 devices, FLAGS.batch_size, start, FLAGS.steps)

    from tqdm import tqdm

    train_key, eval_key = jax.random.split(jax.random.key(FLAGS.seed + 1))
    compute_dtype = jnp.dtype(FLAGS.compute_dtype)
    progress = tqdm(range(start, FLAGS.steps), initial=start, total=FLAGS.steps, desc="training", unit="step")
    window_start, window_tokens = time.perf_counter(), 0
    with metrics_path.open("a") if chief else open(os.devnull, "w") as log:
        for step in progress:
            tokens, mask = (jax.make_array_from_process_local_data(batch_sharding, a)
                            for a in local_batch(tokenizer, step))
            no_grad, grad = sample_recurrence(np.random.default_rng([FLAGS.seed, step]), config.mean_recurrence,
                                              config.mean_backprop_depth)  # the same draw on every process
            with sharding.use(mesh):
                state, metrics = train_step(state, tokens, mask, np.int32(no_grad), np.int32(grad),
                                            jax.random.fold_in(train_key, step), config=config, optimizer=optimizer,
                                            compute_dtype=compute_dtype, remat=FLAGS.remat)
            window_tokens += FLAGS.batch_size * TEXT_LENGTH
            done = step + 1
            record = None
            if done % FLAGS.log_every == 0 or done == FLAGS.steps:
                seconds = time.perf_counter() - window_start
                record = {"step": done, **{k: float(v) for k, v in metrics.items()}, "recurrence": no_grad + grad,
                          "learning_rate": float(optimizer_config.schedule()(step)),
                          "tokens_per_second": window_tokens / seconds}
                window_start, window_tokens = time.perf_counter(), 0
                progress.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['token_accuracy']:.3f}")
            if done % FLAGS.eval_every == 0 or done == FLAGS.steps:
                record = (record or {"step": done}) | heldout_eval(state.params, config, tokenizer,
                                                                   jax.random.fold_in(eval_key, done), mesh)
                logging.info("step %d: %s", done, {k: round(v, 4) for k, v in record.items()})
            if record is not None:
                records.append(record)
                log.write(json.dumps(record) + "\n")
                log.flush()
            if done % FLAGS.checkpoint_every == 0 or done == FLAGS.steps:
                manager.save(done, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()
    manager.close()
    if not chief:
        return
    plot_loss_curve(records, output_dir / "loss_curve.png")
    tokenizer_path = output_dir / "tokenizer.json"
    tokenizer.tokenizer.save(str(tokenizer_path))
    params = jax.device_get(state.params)
    converted.save(output_dir / "model", config, params, overwrite=True, files=[tokenizer_path])
    logging.info("model written to %s (loss curve: %s)", output_dir / "model", output_dir / "loss_curve.png")


if __name__ == "__main__":
    app.run(main)
