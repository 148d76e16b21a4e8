"""A mixture sweep a laptop runs in about 20 minutes: 16 proxy runs of the default model
on the built-in suite with four tasks held out of training (configs/tiny.py:heldout),
each with another mixture of the eight trained tasks; the target is the held-out tasks'
mean answer loss (lower is better: zero-shot transfer to tasks never trained on), which
moves smoothly with the mixture even in short proxies, as RegMix and Data Mixing Laws
use losses.

    jit-tune sweep all --sweep configs/sweep_tiny.py --dir runs/sweep
    jit-tune sweep plan --sweep configs/sweep_tiny.py --dir runs/sweep    (then run, fit, propose, confirm, report)
"""

from ml_collections import ConfigDict

from jit_tune.sweep.config import default_sweep_config

VARIANTS = ("smoke",)  # `sweep_tiny.py:smoke`: 4 proxies of a few steps, for the test suite


def get_config(variant: str | None = None):
    s = default_sweep_config()
    s.name = "sweep_tiny"
    s.base = "configs/tiny.py:heldout"
    # Proxies: the default model, 80 steps of 16 rows, evaluated on 20 examples a task.
    s.overrides = ("--config.train.steps=80", "--config.data.batch_size=16", "--config.optimizer.warmup_steps=10",
                   "--config.train.checkpoint_every=80", "--config.train.log_every=20", "--config.eval.at_start=False",
                   "--config.eval.examples_per_task=20", "--config.eval.max_new_tokens=12")
    # The baseline "examples" (examples-proportional, SeqIO's cap of 3,000): every built-in
    # task can generate more than the cap, so it is the uniform mixture here.
    s.space.cap = 3000
    s.space.kind = "dirichlet"
    s.space.points = 16
    s.space.concentration = 1.0
    s.constraints.min_weight = 0.02
    s.constraints.max_weight = 0.5
    s.target.metrics = ConfigDict({"overall/unseen/held_in/loss": 1.0})
    s.target.maximize = False
    s.confirm.seeds = (0, 1)
    if variant == "smoke":
        s.overrides = ("--config.train.steps=4", "--config.data.batch_size=8", "--config.optimizer.warmup_steps=1",
                       "--config.train.checkpoint_every=4", "--config.eval.at_start=False",
                       "--config.eval.examples_per_task=2", "--config.eval.max_new_tokens=4",
                       "--config.model.d_model=64", "--config.model.n_layers=2", "--config.model.n_heads=4",
                       "--config.model.n_kv_heads=2", "--config.model.head_dim=16", "--config.model.mlp_dim=128")
        s.space.points = 4
        s.confirm.seeds = (0,)
        s.fit.models = ("linear", "lightgbm")  # 4 points: the log-linear law needs more than it has parameters
    return s
