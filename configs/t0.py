"""Instruction tuning on the T0 training sample (../shared/data/t0_train), as a nested
mixture: the T0 paper's task clusters are groups, each examples-proportional with a cap
inside, and the clusters mixed equally (FLAN 2022 mixed its task collections this way).

    jit-tune train --config configs/t0.py --workdir runs/t0
    jit-tune train --config configs/t0.py:smoke --workdir /tmp/t0   # a few steps on CPU
"""

from pathlib import Path

from ml_collections import ConfigDict

from jit_tune.config import default_config, smoke

T0_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "t0_train"
CLUSTERS = {
    "multiple_choice_qa": ("commonsense_qa", "cosmos_qa", "dream", "qasc", "quarel", "quartz", "sciq", "wiki_hop",
                           "wiqa"),
    "extractive_qa": ("adversarial_qa", "duorc", "ropes"),
    "closed_book_qa": ("kilt_tasks_hotpotqa", "wiki_qa"),
    "sentiment": ("amazon_polarity", "app_reviews", "imdb", "rotten_tomatoes"),
    "topic_classification": ("ag_news", "dbpedia_14"),
    "structure_to_text": ("common_gen",),
    "summarization": ("cnn_dailymail", "gigaword", "multi_news", "xsum"),
    "paraphrase_identification": ("glue_mrpc", "glue_qqp"),
}


VARIANTS = ("smoke", "heldout", "heldout_smoke")  # `t0.py:VARIANT`; load_config rejects others
# The `heldout` variant trains on five clusters and evaluates all eight: these three
# zero-shot, by rank classification over each template's answers (as T0 evaluates its
# held-out clusters), the others by their generation metrics.
HELD_OUT_CLUSTERS = ("sentiment", "topic_classification", "paraphrase_identification")


def get_config(variant: str | None = None):
    config = default_config()
    d = config.data
    d.task_dirs = ConfigDict({"t0": {"path": str(T0_DATA), "format": "t0"}})
    d.groups = ConfigDict({
        cluster: {"tasks": tuple(f"t0/{task}" for task in tasks), "rule": "examples", "cap": 1000}
        for cluster, tasks in CLUSTERS.items()
    })
    d.mixture = ConfigDict({cluster: 1.0 for cluster in CLUSTERS})
    d.tokenizer = "bpe"
    d.tokenizer_vocab_size = 8192
    d.seq_len = 512
    d.batch_size = 16
    config.model.vocab_size = 8192
    config.model.d_model = 256
    config.model.n_heads = 8
    config.model.n_kv_heads = 4
    config.model.mlp_dim = 768
    config.train.steps = 1000
    config.optimizer.lr = 1e-3
    config.optimizer.warmup_steps = 100
    config.eval.examples_per_task = 20
    config.eval.max_new_tokens = 16
    if variant and variant.startswith("heldout"):
        d.mixture.update({cluster: 0.0 for cluster in HELD_OUT_CLUSTERS})
        config.eval.clusters = ConfigDict({
            cluster: {"tasks": tuple(f"t0/{task}" for task in tasks), "held_out": cluster in HELD_OUT_CLUSTERS}
            for cluster, tasks in CLUSTERS.items()
        })
        config.eval.at_start = True
    if variant and variant.endswith("smoke"):
        d.tokenizer_vocab_size = 1024
        d.tokenizer_corpus_examples = 20
        d.seq_len = 256
        d.batch_size = 8
        config.model.vocab_size = 1024
        smoke(config, steps=4)
    return config
