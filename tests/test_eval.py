"""Evaluation that measures what instruction tuning is for: eval tasks independent of
the mixture, clusters with held-out ones, metrics that fit each task, aggregation by
template, task, cluster and overall, predictions, few-shot, baselines, contamination."""

import json
from pathlib import Path

import pytest

from jit_tune.cli import main
from jit_tune.config import ConfigError, load_config
from jit_tune.data.registry import build_registry
from jit_tune.eval.examples import task_examples, task_spec
from jit_tune.eval.report import aggregate

REPO = Path(__file__).resolve().parents[1]


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _config_file(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "cfg.py"
    path.write_text("from ml_collections import ConfigDict\nfrom jit_tune.config import default_config, smoke\n\n\n"
                    "def get_config():\n    c = smoke(default_config(), steps=3)\n    c.data.batch_size = 8\n"
                    + "".join(f"    {line}\n" for line in lines) + "    return c\n")
    return path


def _labels(tmp_path: Path) -> Path:
    """A classification file task: few distinct answers (its options)."""
    return _jsonl(tmp_path / "labels.jsonl", [{"prompt": f"Is {w} {i} an animal?", "completion": a}
                                              for i, (w, a) in enumerate([("owl", "yes"), ("cake", "no")] * 40)])


def _summaries(tmp_path: Path) -> Path:
    return _jsonl(tmp_path / "long.jsonl", [{"prompt": f"Describe {i}.", "completion": f"item {i} is a long thing "
                                             "that has many words in its answer"} for i in range(60)])


def test_eval_tasks_are_independent_of_the_mixture(tmp_path):
    config = load_config(str(_config_file(
        tmp_path, f"c.data.tasks.labels = dict(path={str(_labels(tmp_path))!r})",
        "c.data.validation_share = 0.2", "c.data.mixture = ConfigDict({'sort': 1.0, 'reverse': 1.0})",
        "c.eval.tasks = ('sort', 'count', 'labels')")))
    registry = build_registry(config)
    assert registry.eval_tasks == ["sort", "count", "labels"] and registry.rates.keys() == {"sort", "reverse"}
    workdir = tmp_path / "run"
    assert main(["train", "--config", str(tmp_path / "cfg.py"), "--workdir", str(workdir)]) == 0
    results = json.loads((workdir / "eval/results.json").read_text())["results"]
    assert list(results["tasks"]) == ["sort", "count", "labels"]
    assert results["tasks"]["count"]["trained"] is False and results["tasks"]["sort"]["trained"] is True
    assert results["overall"]["unseen"]["held_in"]["tasks"] == 2


def test_a_held_out_cluster_cannot_be_trained_on(tmp_path):
    with pytest.raises(ConfigError, match=r"config.eval.clusters.casing is held out of training, but the mixture "
                                          r"trains on \['capitalize', 'uppercase'\]"):
        load_config(str(_config_file(tmp_path, "c.eval.clusters.casing = dict(tasks=('uppercase', 'capitalize'), "
                                               "held_out=True)")))
    with pytest.raises(ConfigError, match=r"config.eval.tasks = \('sortt',\): \['sortt'\] are not task"):
        load_config(str(_config_file(tmp_path, "c.eval.tasks = ('sortt',)")))
    with pytest.raises(ConfigError, match=r"config.eval.metrics.sort = .*metrics are some of"):
        load_config(str(_config_file(tmp_path, "c.eval.metrics.sort = dict(metrics=('bleu',))")))
    for setting, said in (("c.eval.clusters.c = dict(tasks='sort')", r"clusters.c.tasks = 'sort': expected a non-empty "
                                                                      "tuple of task names"),
                          ("c.eval.clusters.c = dict(tasks=('sort',), held_out='no')", r"clusters.c.held_out = 'no': "
                                                                                        "expected True or False"),
                          ("c.eval.metrics.sort = dict(metrics='exact_match')", r"metrics.sort = .*'metrics' and "
                                                                                 "'normalize' are tuples of names")):
        with pytest.raises(ConfigError, match=said):  # a string's letters are not names
            load_config(str(_config_file(tmp_path, setting)))


def test_the_default_metric_rule_and_its_overrides(tmp_path):
    config = load_config(str(_config_file(
        tmp_path, f"c.data.tasks.labels = dict(path={str(_labels(tmp_path))!r})",
        f"c.data.tasks.long = dict(path={str(_summaries(tmp_path))!r})", "c.data.validation_share = 0.2",
        "c.eval.tasks = ('labels', 'long', 'reverse', 'has_duplicates', 'sort')",
        "c.eval.metrics.sort = dict(metrics=('token_f1', 'exact_match'), normalize=('case',))")))
    registry = build_registry(config)
    spec = {name: task_spec(registry, name, task_examples(config, registry, name)) for name in registry.eval_tasks}
    assert spec["labels"].metrics[0] == "acc" and set(spec["labels"].metrics) == {"acc", "acc_norm", "acc_token_mean"}
    assert spec["long"].metrics == ("rouge_l", "token_f1")
    assert spec["reverse"].metrics == ("exact_match",) and spec["reverse"].normalize == ("whitespace",)
    assert spec["has_duplicates"].metrics[0] == "exact_match" and "acc" in spec["has_duplicates"].metrics
    assert spec["sort"].metrics == ("token_f1", "exact_match") and spec["sort"].normalize == ("case",)
    labels = task_examples(config, registry, "labels")
    assert labels and all(e.options == ("no", "yes") for e in labels)


def test_aggregation_by_template_task_cluster_and_overall(tmp_path):
    from jit_tune.eval.examples import TaskSpec

    config = load_config(str(_config_file(tmp_path, "c.eval.clusters.c = dict(tasks=('sort', 'reverse'))",
                                          "c.data.mixture.reverse = 0.0")))
    registry = build_registry(config)
    spec = TaskSpec(("exact_match",), ("whitespace",))
    specs = {name: spec for name in registry.eval_tasks}

    def record(task, template, em, held_out=False):
        return {"task": task, "template": template, "held_out": held_out, "exact_match": em, "loss_sum": 2.0,
                "loss_tokens": 4}
    records = ([record("sort", "0", 1.0)] * 3 + [record("sort", "0", 0.0)] + [record("sort", "1", 0.0)] * 2
               + [record("sort", "2", 1.0)] + [record("sort", "4", 0.0, True)] * 2
               + [record("reverse", "0", 1.0)] * 2)
    results = aggregate(records, specs, registry)
    sort = results["tasks"]["sort"]
    assert sort["templates"]["0"] == {"held_out": False, "n": 4, "loss": 0.5, "exact_match": 0.75, "score": 0.75}
    assert sort["held_in"]["n"] == 7 and sort["held_in"]["templates"] == 3
    assert sort["held_in"]["mean"]["exact_match"] == pytest.approx((0.75 + 0.0 + 1.0) / 3)  # each template alike
    assert sort["held_in"]["median"]["exact_match"] == 0.75
    assert sort["held_out"]["mean"]["score"] == 0.0 and sort["held_out"]["n"] == 2
    cluster = results["clusters"]["c"]["held_in"]
    assert cluster["tasks"] == 2 and cluster["mean"]["score"] == pytest.approx(((0.75 + 1.0) / 3 + 1.0) / 2)
    assert results["overall"]["unseen"]["held_in"]["mean"]["score"] == 1.0  # reverse is not trained here
    assert results["tasks"]["count"]["metrics"] == ["exact_match"] and "held_in" not in results["tasks"]["count"]


def test_a_run_logs_task_and_cluster_metrics_and_saves_predictions(tmp_path):
    workdir = tmp_path / "run"
    assert main(["train", "--config", "configs/tiny.py:heldout_smoke", "--workdir", str(workdir)]) == 0
    assert json.loads((workdir / "eval/results_step0.json").read_text())["step"] == 0  # the baseline
    logged = {k for line in (workdir / "metrics.jsonl").read_text().splitlines() for k in json.loads(line)}
    for key in ("eval/task/sort/held_in/exact_match", "eval/task/count_unique/held_out/acc",
                "eval/cluster/counting/held_in/score", "eval/overall/unseen/held_in/score"):
        assert key in logged, key
    lines = [json.loads(line) for line in (workdir / "eval/predictions/step_6/has_duplicates.jsonl").read_text()
             .splitlines()]
    assert len(lines) == 8 and {"prompt", "target", "prediction", "options", "exact_match", "acc"} <= set(lines[0])
    assert [o["option"] for o in lines[0]["options"]] == ["yes", "no"]
    assert all(isinstance(o["loglik"], float) and o["loglik"] < 0 for o in lines[0]["options"])


def test_few_shot_prompts_hold_exemplars_of_the_same_template_from_the_train_split(tmp_path):
    records = [{"word": f"w{i}", "label": "yes" if i % 2 else "no"} for i in range(80)]
    path = _jsonl(tmp_path / "raw.jsonl", records)
    templates = "dict(templates=[('Word: {{word}}', '{{label}}'), ('Is {{word}} odd?', '{{label}}')], held_out=1)"
    config = load_config(str(_config_file(
        tmp_path, f"c.data.tasks.raw = dict(path={str(path)!r}, format='templated', templates={templates})",
        "c.data.validation_share = 0.2", "c.eval.shots = 2", "c.eval.tasks = ('raw', 'sort')")))
    registry = build_registry(config)
    task = registry.tasks["raw"]
    validation = {task.record("validation", i)[1]["word"] for i in range(task.size("validation"))}
    for example in task_examples(config, registry, "raw"):
        blocks = example.messages[0]["content"].split("\n\n")
        assert len(blocks) == 3  # two exemplars, then the prompt
        prefix = "Is " if example.held_out else "Word: "
        assert all(b.startswith(prefix) for b in blocks)
        shot_words = {b.split()[1].rstrip("?") for b in blocks[:2]}
        assert not shot_words & validation  # exemplars come from the train split only
    for example in task_examples(config, registry, "sort"):
        blocks = example.messages[0]["content"].split("\n\n")
        opening = registry.tasks["sort"].template(int(example.template)).split("{words}")[0]
        assert len(blocks) == 3 and all(b.startswith(opening) for b in blocks)


def test_a_hugging_face_model_is_evaluated_before_tuning(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from jit_tune.data.tokenizer import train_builtin_tokenizer

    hf = tmp_path / "hf"
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                      num_hidden_layers=2, intermediate_size=128)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(hf)
    train_builtin_tokenizer(512, seed=0).save_pretrained(hf)
    out = tmp_path / "baseline"
    assert main(["eval", "--hf", str(hf), "--config", "configs/tiny.py:heldout_smoke", "--out", str(out)]) == 0
    assert "Evaluation at step 0" in capsys.readouterr().out
    results = json.loads((out / "eval/results.json").read_text())["results"]
    assert len(results["tasks"]) == 12 and "counting" in results["clusters"]
    assert main(["eval", "--hf", str(hf)]) == 2
    assert "give --config" in capsys.readouterr().err


def test_data_inspect_warns_when_eval_examples_were_trained_on(tmp_path, capsys):
    path = _labels(tmp_path)
    config = _config_file(tmp_path, f"c.data.tasks.labels = dict(path={str(path)!r})",
                          f"c.data.tasks.again = dict(path={str(path)!r})", "c.data.validation_share = 0.2",
                          "c.data.mixture = ConfigDict({'labels': 1.0})", "c.eval.tasks = ('again', 'sort')",
                          "c.eval.examples_per_task = 20")
    assert main(["data", "inspect", "--config", str(config), "--sample", "50"]) == 0
    out = capsys.readouterr().out
    # "again" splits its records by its own name's hash: its validation records are trained as "labels".
    assert "WARNING: again may be contaminated" in out and "WARNING: sort" not in out


def test_a_run_reads_and_indexes_each_task_file_once(tmp_path, monkeypatch):
    """The registry is built once per run and passed down (the pipeline, the logs and the
    evaluator used to rebuild and re-index every source about four times)."""
    from jit_tune.data import sources

    opened = []
    original = sources.JsonlSource.__init__

    def counting(self, path):
        opened.append(str(path))
        original(self, path)

    monkeypatch.setattr(sources.JsonlSource, "__init__", counting)
    config = _config_file(tmp_path, f"c.data.tasks.labels = dict(path={str(_labels(tmp_path))!r})",
                          "c.data.validation_share = 0.2", "c.data.mixture = ConfigDict({'labels': 1.0})")
    assert main(["train", "--config", str(config), "--workdir", str(tmp_path / "run")]) == 0
    assert opened == [str(tmp_path / "labels.jsonl")]


@pytest.mark.slow  # long rows: 25 s
def test_evaluation_of_long_rows_fits_where_their_training_does(tmp_path):
    """Rows of 4,096 tokens, 2 a step. Evaluation once scored 128 such rows a pass with
    their whole float32 logits and asked for 38 GB; now it scores a training microbatch's
    rows (eval.batch_size 0) with the logits in chunks, and the run stays under 6 GB."""
    import os
    import subprocess
    import sys

    run = ("import resource, subprocess, sys; "
           "code = subprocess.run([sys.executable, '-m', 'jit_tune.cli', *sys.argv[1:]]).returncode; "
           "print('peak_kb', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    result = subprocess.run(
        [sys.executable, "-c", run, "train", "--config", "configs/tiny.py:smoke", "--workdir", str(tmp_path / "run"),
         "--config.data.seq_len=4096", "--config.data.batch_size=2", "--config.data.packing_bins=4",
         "--config.eval.examples_per_task=2"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    peak_gb = int(result.stdout.split("peak_kb")[-1]) / 2**20
    assert peak_gb < 6, peak_gb
    assert json.loads((tmp_path / "run/eval/results.json").read_text())["results"]["overall"]


def test_prompts_cut_to_fit_a_row_are_counted_and_said(tmp_path, capsys):
    """Eight exemplars before each prompt, rows of 48 tokens: most prompts lose their
    first tokens, as in training. The table says how many; the predictions say by how
    much, with the whole prompt; results.json counts them."""
    workdir = tmp_path / "run"
    assert main(["train", "--config", "configs/tiny.py:smoke", "--workdir", str(workdir), "--config.data.seq_len=48",
                 "--config.eval.shots=8", "--config.eval.tasks=('sort',)"]) == 0
    out = capsys.readouterr().out
    results = json.loads((workdir / "eval/results.json").read_text())["results"]
    cut, of = results["prompts_cut"]["examples"], results["prompts_cut"]["of"]
    assert 0 < cut <= of and f"{cut} of {of} examples did not fit a row (data.seq_len) with their answer" in out
    records = [json.loads(line) for line in (workdir / "eval/predictions/step_6/sort.jsonl").read_text().splitlines()]
    assert sum(r["prompt_tokens_cut"] > 0 for r in records) == cut == len(records)
    assert all(r["prompt"].count("\n\n") == 8 for r in records)  # the whole prompt, for whoever reads it
