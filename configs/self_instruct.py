"""FLAN-style templates over raw fields: the Self-Instruct seed tasks
(../shared/data/self_instruct/seed_tasks.jsonl: instruction, instances[{input, output}])
rendered by several templates, some examples few-shot with exemplars from the same
task's train split, some inverted (write the instruction for an answer), with the last
template held out for evaluation; mixed with the built-in suite.

    jit-tune data inspect --config configs/self_instruct.py
    jit-tune train --config configs/self_instruct.py:smoke --workdir /tmp/si
"""

from pathlib import Path

from ml_collections import ConfigDict

from jit_tune.config import default_config, smoke

SEED_TASKS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "self_instruct" / "seed_tasks.jsonl"
INPUT = "{% if instances[0].input %}\n\n{{ instances[0].input }}{% endif %}"


VARIANTS = ("smoke",)  # `self_instruct.py:VARIANT`; load_config rejects others


def get_config(variant: str | None = None):
    config = default_config()
    d = config.data
    d.tasks.seed_tasks = dict(path=str(SEED_TASKS), format="templated", templates=dict(
        templates=[
            ("{{ instruction }}" + INPUT, "{{ instances[0].output }}"),
            ("Task: {{ instruction }}" + INPUT.replace("\n\n", "\nInput: ", 1) + "\nAnswer:",
             "{{ instances[0].output }}"),
            dict(name="held_out", prompt="Here is a request.\n{{ instruction }}" + INPUT + "\nRespond to it.",
                 completion="{{ instances[0].output }}"),
        ],
        held_out=1,
        few_shot_share=0.3, shots=2,
        inverted=[("Write an instruction that this text answers:\n\n{{ instances[0].output }}",
                   "{{ instruction }}")],
        invert_share=0.1,
    ))
    d.validation_share = 0.1
    d.mixture = ConfigDict({**d.mixture, "seed_tasks": 4.0})  # beside the 12 built-in tasks at 1.0 each
    d.tokenizer = "bpe"
    d.tokenizer_vocab_size = 2048
    d.seq_len = 512
    d.batch_size = 8
    config.model.vocab_size = 2048
    if variant == "smoke":
        d.tokenizer_corpus_examples = 50
        smoke(config, steps=3)
    return config
