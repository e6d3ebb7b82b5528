"""The diffusion forcing sampler (arXiv 2510.14961), the reference's `generate_diffusion_style`.

Every sampler step runs the prelude, `inner_recurrence` core steps and the coda over a wavefront
of not-yet-frozen positions, drafts a token for each of them plus one new position, and freezes
the positions whose latents converged; frozen positions leave the wavefront and keep their keys
in the cache. A new token is decoded on every step while earlier ones keep being refined.

The package, in the order a run goes through it:
- `sampler`: `generate_diffusion_style`, its options and checks;
- `settings`: the traced `Settings` (new values never recompile), the static `Plan`, `PRESETS`
  and the window widths;
- `state`: the sampler state by concern (`Wavefront`, `FreezeMemory`, `Statistics`, `Tablets`);
- `loop`: the start (prefill, first wavefront) and phases of compiled steps on a window and an
  attention view that fit the wavefront and the text;
- `step`: one sampler step as a composition of named stages;
- `freeze`: the freeze rules, policy objects chosen by name (`FREEZE_RULES`), all in one program;
- `output`: the output record and statistics.

Batches: each sequence has its own wavefront, freeze front, stop state and statistics, and its
randomness depends on (key, step, purpose, position) only, so a batch gives what each prompt gives
alone. Latent states live in ring buffers of `max_wavefront` entries indexed by position.

The reference's bookkeeping is reproduced exactly, including where it is surprising (see
`freeze`). Two quirks that hurt users change by default and come back with
`reference_compatible=True`:
- stop tokens: the reference looks for them only after `num_steps` sampler steps and only among the
  tokens frozen in that step, so a stop token frozen earlier is missed and generation overruns;
  here every newly frozen token (the prefill's included) is checked at every step and the output
  ends at the first stop, and with the latent freeze rules a stop token drafted by a state that
  converged in this step ends it too (it is final, as AR would emit it; the reference waits for the
  latent of the position that reads the stop token, which a model may never have trained and which
  need not converge); stop strings are matched on the frozen tokens as they freeze;
- headway filler: the reference fills the extra `headway - 1` positions with random ids from
  [0, 65510), special tokens included; here the ids come from [0, 65504), the ordinary vocabulary.
In default mode the output also stops at `max_new_tokens`; the reference returns every frozen token.
With `full_prefill=False` the prompt enters the wavefront (it must fit in `max_wavefront`); its
tokens are given and never replaced by drafts (the reference would overwrite its unfrozen tail).
"""

from samplers.diffusion.freeze import FREEZE_RULES, FREEZE_STRATEGIES, FreezeRule
from samplers.diffusion.output import STAT_NAMES
from samplers.diffusion.sampler import generate_diffusion_style
from samplers.diffusion.settings import PRESETS, Settings

__all__ = ["FREEZE_RULES", "FREEZE_STRATEGIES", "PRESETS", "STAT_NAMES", "FreezeRule", "Settings",
           "generate_diffusion_style"]
