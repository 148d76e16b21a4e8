"""FLAN-style templates over raw-field records: deterministic template choice, answer
options, few-shot exemplars from the train split, input inversion, held-out templates,
and errors that name the file, line, field or config key."""

import collections
import json
from pathlib import Path

import pytest

from jit_tune.data.registry import build_registry
from jit_tune.eval.examples import task_examples
from jit_tune.data import pipeline
from jit_tune.data.sources import SourceError
from jit_tune.data.tasks import file_tasks, train_examples

REVIEWS = [{"review": f"review number {i} is {'great' if i % 2 else 'awful'}",
            "label": "positive" if i % 2 else "negative"} for i in range(200)]
TEMPLATES = dict(
    templates=[
        ("{{review}}\nIs this review positive or negative?\n{{options_}}", "{{label}}"),
        dict(name="did_like", prompt="Review: {{review}}\nDid the writer like it?", completion="{{label}}"),
        ("What is the sentiment of: {{review}}", "{{label}}"),
    ],
    options=["positive", "negative"],
    held_out=1,
)


def _task(tmp_path, smoke_config, records=REVIEWS, **templates):
    path = tmp_path / "reviews.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    smoke_config.data.tasks = {"reviews": dict(path=str(path), format="templated",
                                               templates={**TEMPLATES, **templates})}
    return file_tasks(smoke_config)["reviews"], smoke_config


def _train(task, config, count):
    examples = train_examples(task, config)
    return [examples[i] for i in range(count)]


def test_templates_are_assigned_deterministically_and_vary_by_epoch(tmp_path, smoke_config):
    task, config = _task(tmp_path, smoke_config)
    size = task.size("train")
    first = _train(task, config, 2 * size)
    assert first == _train(file_tasks(config)["reviews"], config, 2 * size)  # a fresh reader agrees
    used = collections.Counter(e["template"] for e in first)
    assert set(used) == {"t0", "did_like"}  # the held-out third is never trained on
    assert min(used.values()) > 0.35 * len(first)
    by_record = collections.defaultdict(set)
    for e in first:
        by_record[e["messages"][0]["content"].split("review number ")[1].split(" ")[0]].add(e["template"])
    assert sum(len(t) == 2 for t in by_record.values()) > 0.3 * len(by_record)  # new template next epoch


def test_options_are_rendered_and_answers_trained(tmp_path, smoke_config, tokenizer):
    from jit_tune.data.render import tokenize_conversation

    task, _ = _task(tmp_path, smoke_config)
    example = next(task.example("train", p) for p in range(20) if task.example("train", p)["template"] == "t0")
    prompt, answer = (m["content"] for m in example["messages"])
    assert prompt.endswith("OPTIONS:\n- positive\n- negative") and answer in ("positive", "negative")
    ids, mask = tokenize_conversation(tokenizer, example["messages"])
    assert tokenizer.decode(ids[mask.astype(bool)]) == answer + "<|eos|>"


def test_per_record_options_and_format_syntax(tmp_path, smoke_config):
    records = [{"q": f"pick {i}", "choices": [f"a{i}", f"b{i}"], "a": f"a{i}"} for i in range(20)]
    task, _ = _task(tmp_path, smoke_config, records, syntax="format", options=None, options_field="choices",
                    held_out=0, templates=[("{q}\n{options_}", "{a}")])
    prompt, answer = (m["content"] for m in task.example("train", 0)["messages"])
    number = prompt.split("\n")[0].removeprefix("pick ")
    assert prompt == f"pick {number}\nOPTIONS:\n- a{number}\n- b{number}" and answer == f"a{number}"


def test_few_shot_exemplars_come_from_the_train_split_and_never_the_example(tmp_path, smoke_config):
    task, config = _task(tmp_path, smoke_config, few_shot_share=1.0, shots=3, held_out=0)
    train_reviews = {task.record("train", p)[1]["review"] for p in range(task.size("train"))}
    counts = collections.Counter()
    for position in range(60):
        example = task.example("train", position)
        own = task.record("train", position)[1]["review"]
        blocks = example["messages"][0]["content"].split("\n\n")
        exemplars, final = blocks[:-1], blocks[-1]
        counts[len(exemplars)] += 1
        assert own in final
        for block in exemplars:
            review = next(r for r in train_reviews if r in block)
            assert review != own and block.rstrip().endswith(("positive", "negative"))
    assert set(counts) == {1, 2, 3}
    validation = task.example("validation", 0)
    assert all(any(r in b for r in train_reviews) for b in validation["messages"][0]["content"].split("\n\n")[:-1])
    zero = _task(tmp_path, config, few_shot_share=0.0)[0]
    assert all("\n\n" not in zero.example("train", p)["messages"][0]["content"] for p in range(60))


def test_input_inversion_asks_for_the_input(tmp_path, smoke_config):
    inverted = [("Write a {{label}} review.", "{{review}}")]
    task, _ = _task(tmp_path, smoke_config, inverted=inverted, invert_share=0.3)
    examples = [task.example("train", p) for p in range(200 - task.size("validation"))]
    flipped = [e for e in examples if e["template"] == "inverted0"]
    assert 0.15 < len(flipped) / len(examples) < 0.45
    prompt, answer = (m["content"] for m in flipped[0]["messages"])
    assert prompt in ("Write a positive review.", "Write a negative review.") and answer.startswith("review number")


def test_held_out_templates_are_scored_not_trained(tmp_path, smoke_config):
    task, config = _task(tmp_path, smoke_config)
    config.data.mixture = {"reviews": 1.0}
    examples = task_examples(config, build_registry(config), "reviews")
    held_in = [e for e in examples if not e.held_out]
    held_out = [e for e in examples if e.held_out]
    assert held_in and held_out
    assert {e.template for e in held_out} == {"t2"} and "t2" not in {e.template for e in held_in}
    rows = next(iter(pipeline.train_dataset(config, pipeline.run_tokenizer(config, build_registry(config)), build_registry(config))))
    assert rows["loss_mask"].sum() > 0 and (rows["segment_ids"] > 0).mean() > 0.5


@pytest.mark.parametrize("change, message", [
    (dict(templates=[("{{review", "{{label}}")]), "templates.templates[0].prompt: Jinja syntax error"),
    (dict(syntax="format", templates=[("{review", "{label}")]), "templates.templates[0].prompt: format string"),
    (dict(templates=[("only one part",)]), "templates[0]: expected a (prompt, completion) pair"),
    (dict(templates=[]), "expected at least one (prompt, completion) template"),
    (dict(held_out=3), "held_out = 3: expected an integer from 0 to 2"),
    (dict(few_shot_share=1.5), "few_shot_share = 1.5: expected a number in [0, 1]"),
    (dict(invert_share=0.1), "invert_share = 0.1: needs templates in"),
    (dict(options_field="choices"), "set options or options_field, not both"),
    (dict(shots=0), "shots = 0: expected a positive integer"),
    (dict(syntax="mustache"), "syntax = 'mustache': expected one of"),
    (dict(typo=1), "unknown keys ['typo']"),
    # a field in the other syntax reads nothing: every example would get the same text
    (dict(templates=[("Review: {review}", "{{label}}")]), "reads no field of the record, so every example would get "
     "the same text; expected a template naming fields; {review} is the format syntax's way to name a field"),
    (dict(syntax="format", templates=[("{review}", "{{ label }}")]), "templates[0].completion = '{{ label }}': reads "
     "no field"),
    (dict(templates=[("{{review}}", "positive")]), "templates[0].completion = 'positive': reads no field"),
])
def test_bad_template_specs_name_the_config_key(tmp_path, smoke_config, change, message):
    with pytest.raises(SourceError, match="config.data.tasks.reviews") as error:
        _task(tmp_path, smoke_config, **change)
    assert message in str(error.value)


def test_a_record_missing_a_template_field_names_file_line_and_template(tmp_path, smoke_config):
    records = REVIEWS[:5] + [{"review": "no label here"}] + REVIEWS[5:]
    task, config = _task(tmp_path, smoke_config, records)
    bad = next(p for p in range(task.size("train")) if task.record("train", p)[1].get("label") is None)
    with pytest.raises(SourceError, match=r"reviews\.jsonl:6: template '.*' reads a field the record lacks"):
        task.example("train", bad)
    config.data.on_bad_record = "skip"
    skipped = file_tasks(config)["reviews"].example("train", bad)  # a marker the pipeline counts and drops
    assert skipped["bad_record"].endswith("reviews.jsonl:6: template 'did_like' reads a field the record lacks "
                                          "('label' is undefined); the record has ['review']")


def test_a_template_failing_on_a_record_s_values_names_file_line_and_template(tmp_path, smoke_config):
    records = REVIEWS[:3] + [{"review": "zero", "label": ""}] + REVIEWS[3:]
    per = {"name": "per", "prompt": "{{ review }} {{ 10 // (label | length) }}", "completion": "{{ label }}"}
    task, _ = _task(tmp_path, smoke_config, records, templates=[per], held_out=0)
    bad = next(p for p in range(task.size("train")) if task.record("train", p)[1]["label"] == "")
    with pytest.raises(SourceError, match=r"reviews\.jsonl:4: template 'per' failed on this record: "
                                          "ZeroDivisionError"):
        task.example("train", bad)


def test_templates_only_with_the_templated_format(tmp_path, smoke_config):
    path = tmp_path / "pc.jsonl"
    path.write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n")
    smoke_config.data.tasks = {"pc": dict(path=str(path), templates=TEMPLATES)}
    with pytest.raises(SourceError, match="only format 'templated' uses templates"):
        file_tasks(smoke_config)
    smoke_config.data.tasks = {"pc": dict(path=str(path), format="templated")}
    with pytest.raises(SourceError, match="format 'templated' needs 'templates'"):
        file_tasks(smoke_config)


SEED_TASKS = Path(__file__).resolve().parents[2] / "shared" / "data" / "self_instruct" / "seed_tasks.jsonl"


@pytest.mark.skipif(not SEED_TASKS.exists(), reason="../shared/data is absent (a fresh clone); it holds the "
                                                     "Self-Instruct seed tasks")
@pytest.mark.slow
def test_self_instruct_config_trains_and_scores_its_held_out_template(tmp_path):
    from jit_tune.cli import main

    workdir = tmp_path / "si"
    assert main(["train", "--config", "configs/self_instruct.py:smoke", "--workdir", str(workdir)]) == 0
    results = json.loads((workdir / "eval/results.json").read_text())["results"]
    assert {"held_in", "held_out"} <= set(results["tasks"]["seed_tasks"])
    assert results["tasks"]["seed_tasks"]["held_out"]["templates"] == 1
