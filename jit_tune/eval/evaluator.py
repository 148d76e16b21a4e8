"""Evaluation: every eval task's validation examples scored by the metrics that fit it
(eval/examples.py), in three passes over the model:

- the loss of each reference answer (the tokens training would train), and
- each answer option's log-likelihood given the prompt (rank classification), both
  through packed rows with segment ids (eval/scoring.py), many sequences per forward pass;
- greedy generation, for tasks with generation metrics.

The per-example values are aggregated by eval/report.py (template, task, cluster,
overall) and, with eval.predictions, saved one JSON line per example.
"""

from __future__ import annotations

import numpy as np
from ml_collections import ConfigDict
from transformers import PreTrainedTokenizerBase

from jit_tune.data.registry import TaskRegistry
from jit_tune.data.render import prompt_ids, tokenize_conversation
from jit_tune.eval import metrics as metrics_lib
from jit_tune.eval.decode import generate
from jit_tune.eval.examples import EvalExample, TaskSpec, task_examples, task_spec
from jit_tune.eval.report import aggregate
from jit_tune.eval.scoring import sequence_logliks
from jit_tune.models.decoder import Decoder


def _answer_sequence(tokenizer, example: EvalExample, answer: str, seq_len: int, train_on: str):
    """(ids, mask, cut) of the prompt and `answer` as training renders them, the mask on
    the answer's trained tokens; the prompt is cut from the left to fit a row, as in
    training, by `cut` tokens. None if the answer alone does not fit."""
    messages = example.messages[:-1] + [{"role": "assistant", "content": answer}]
    ids, mask = tokenize_conversation(tokenizer, messages, train_on)
    if not mask.any():
        return None
    cut = max(len(ids) - seq_len, 0)
    if cut >= int(np.argmax(mask)):  # the first scored token needs a token before it
        return None
    return ids[cut:], mask[cut:], cut


def eval_rows(config: ConfigDict) -> int:
    """Rows of data.seq_len per scoring pass, and prompts per generate call: eval.batch_size,
    or (0) a training microbatch's rows, which fit in memory wherever training does."""
    return config.eval.batch_size or config.data.batch_size // config.train.microbatches


def _score(model: Decoder, sequences: list, config: ConfigDict) -> list[tuple[float, int] | None]:
    """Summed log-likelihood and token count of each sequence (None stays None)."""
    present = [s[:2] for s in sequences if s is not None]
    if not present:
        return [None] * len(sequences)
    sums, counts = sequence_logliks(model, present, config.data.seq_len, eval_rows(config),
                                    chunk=config.train.loss_chunk)
    scored = iter(zip(sums.tolist(), counts.tolist()))
    return [None if s is None else next(scored) for s in sequences]


def evaluate(model: Decoder, tokenizer: PreTrainedTokenizerBase, config: ConfigDict, registry: TaskRegistry) -> dict:
    """The eval tasks' results (see eval/report.py for their shape), with the
    per-example records under "records" for the predictions files."""
    e, seq_len, train_on = config.eval, config.data.seq_len, config.data.train_on
    examples = {name: task_examples(config, registry, name) for name in registry.eval_tasks}
    specs = {name: task_spec(registry, name, items) for name, items in examples.items()}
    flat = [(name, example) for name, items in examples.items() for example in items]
    records = [{"task": name, "template": ex.template, "held_out": ex.held_out, "target": ex.target,
                "prompt": tokenizer.decode(prompt_ids(tokenizer, ex.messages[:-1]))} for name, ex in flat]

    # Loss of the reference answers. A prompt that does not fit a row with its answer loses
    # its first tokens, as in training (few-shot exemplars make long prompts); counted.
    references = [_answer_sequence(tokenizer, ex, ex.target, seq_len, train_on) for _, ex in flat]
    losses = _score(model, references, config)
    for record, reference, scored in zip(records, references, losses):
        record["loss_sum"], record["loss_tokens"] = (-scored[0], scored[1]) if scored else (0.0, 0)
        record["prompt_tokens_cut"] = reference[2] if reference else 0

    # Rank classification: every option's log-likelihood, in one packed pass.
    ranked = [(i, ex) for i, (name, ex) in enumerate(flat) if specs[name].ranked and ex.options]
    option_sequences = [_answer_sequence(tokenizer, ex, option, seq_len, train_on)
                        for _, ex in ranked for option in ex.options]
    option_scores = iter(_score(model, option_sequences, config))
    for i, ex in ranked:
        scores = [next(option_scores) for _ in ex.options]
        _rank(records[i], ex, scores, specs[flat[i][0]])

    # Generation, for the tasks scored on generated text.
    generated = [(i, ex) for i, (name, ex) in enumerate(flat) if specs[name].generated]
    if generated:
        prompts = [prompt_ids(tokenizer, ex.messages[:-1])[-seq_len:] for _, ex in generated]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        outputs = generate(model, prompts, e.max_new_tokens, tokenizer.eos_token_id, pad, eval_rows(config))
        for (i, ex), output in zip(generated, outputs):
            prediction = tokenizer.decode(output, skip_special_tokens=True).strip()
            records[i]["prediction"] = prediction
            spec = specs[flat[i][0]]
            for metric in spec.metrics:
                if metric in metrics_lib.GENERATION_METRICS:
                    records[i][metric] = metrics_lib.score_generation(metric, prediction, ex.target, spec.normalize)
    results = aggregate(records, specs, registry)
    results["prompts_cut"] = {"examples": sum(r["prompt_tokens_cut"] > 0 for r in records), "of": len(records)}
    results["records"] = records
    return results


def _rank(record: dict, example: EvalExample, scores: list, spec: TaskSpec) -> None:
    """An example's rank-classification outcome under each rule, and what it was."""
    record["options"] = [{"option": o, "loglik": s[0] if s else None, "tokens": s[1] if s else 0}
                         for o, s in zip(example.options, scores)]
    if example.target not in example.options or any(s is None for s in scores):
        return  # the reference is not among the options, or an option does not fit a row
    logliks, tokens = [s[0] for s in scores], [s[1] for s in scores]
    chars = [len(o) for o in example.options]
    outcome = metrics_lib.rank_accuracy(logliks, tokens, chars, example.options.index(example.target))
    record.update({m: v for m, v in outcome.items() if m in spec.metrics})
    record.setdefault("prediction", example.options[metrics_lib.rank_choices(logliks, tokens, chars)["acc"]])
