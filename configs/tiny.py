"""The default job: a 1.8M-parameter Llama-style decoder instruction-tuned on the built-in
task suite, sized to finish on a 2-core CPU in under ten minutes.

    jit-tune train --config configs/tiny.py --workdir runs/tiny
    jit-tune train --config configs/tiny.py:smoke --workdir /tmp/smoke   # a few steps

The `heldout` variant is FLAN's experiment in miniature: it trains on eight of the
twelve tasks and evaluates all twelve, the other four zero-shot, grouped in clusters
by the skill they need (each held-out task shares its skill with a trained one), and
evaluates at step 0 too, so the table before tuning is the baseline.

    jit-tune train --config configs/tiny.py:heldout --workdir runs/heldout
"""

from ml_collections import ConfigDict

from jit_tune.config import default_config, smoke

VARIANTS = ("smoke", "heldout", "heldout_smoke")  # `tiny.py:VARIANT`; load_config rejects others
SKILLS = {
    "ordering": ("reverse", "sort", "sort_desc"),
    "counting": ("count", "count_unique", "has_duplicates"),
    "casing": ("uppercase", "capitalize"),
    "picking": ("first", "last"),
    "editing": ("dedupe", "commas"),
}
HELD_OUT_TASKS = ("sort_desc", "count_unique", "capitalize", "last")


def get_config(variant: str | None = None):
    config = default_config()
    # Tasks that need comparisons across the whole list learn slowest; sample them more
    # often than the ones that only look at one word.
    config.data.mixture.update({
        "has_duplicates": 2.5, "count_unique": 2.0,
        "reverse": 1.5, "sort": 1.5, "sort_desc": 1.5, "dedupe": 1.5,
        "first": 0.5, "last": 0.5, "count": 0.5,
    })
    if variant and variant.startswith("heldout"):
        config.data.mixture.update({task: 0.0 for task in HELD_OUT_TASKS})
        config.eval.clusters = ConfigDict({name: {"tasks": tasks} for name, tasks in SKILLS.items()})
        config.eval.at_start = True
    if variant and variant.endswith("smoke"):  # a few steps on a tiny model: checks the whole path quickly
        smoke(config, steps=6)
        config.data.batch_size = 8
        config.eval.examples_per_task = 4
        config.eval.max_new_tokens = 8
    return config
