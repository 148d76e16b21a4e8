"""The default job: a 1.8M-parameter Llama-style decoder instruction-tuned on the built-in
task suite, sized to finish on a 2-core CPU in under ten minutes.

    jit-tune train --config configs/tiny.py --workdir runs/tiny
    jit-tune train --config configs/tiny.py:smoke --workdir /tmp/smoke   # a few steps
"""

from jit_tune.config import default_config, smoke


VARIANTS = ("smoke",)  # `tiny.py:VARIANT`; load_config rejects others


def get_config(variant: str | None = None):
    config = default_config()
    # Tasks that need comparisons across the whole list learn slowest; sample them more
    # often than the ones that only look at one word.
    config.data.mixture.update({
        "has_duplicates": 2.5, "count_unique": 2.0,
        "reverse": 1.5, "sort": 1.5, "sort_desc": 1.5, "dedupe": 1.5,
        "first": 0.5, "last": 0.5, "count": 0.5,
    })
    if variant == "smoke":  # a few steps on a tiny model: checks the whole path quickly
        smoke(config, steps=6)
        config.data.batch_size = 8
        config.eval.examples_per_task = 4
        config.eval.max_new_tokens = 8
    return config
