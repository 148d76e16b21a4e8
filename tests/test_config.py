import json

import pytest

from jit_tune.config import ConfigError, load_config
from jit_tune.cli import main

TINY = "configs/tiny.py"


def test_override_typo_names_the_closest_key():
    with pytest.raises(ConfigError, match=r"config.optimizer has no field 'lrr'; did you mean config.optimizer.lr\?"):
        load_config(TINY, ["--config.optimizer.lrr=1e-4"])


def test_section_typo_names_the_closest_key():
    with pytest.raises(ConfigError, match=r"did you mean config.optimizer\?"):
        load_config(TINY, ["--config.optimiser.lr=1e-4"])


def test_override_sets_typed_values():
    config = load_config(TINY, ["--config.optimizer.lr=3e-4", "--config.train.steps=70", "--config.data.mixture.sort=2"])
    assert config.optimizer.lr == 3e-4 and config.train.steps == 70 and config.data.mixture.sort == 2.0


def test_wrong_type_is_rejected():
    with pytest.raises(ConfigError, match="--config.train.steps=many: expected a int"):
        load_config(TINY, ["--config.train.steps=many"])


def test_bad_value_names_flag_field_and_expectation():
    with pytest.raises(ConfigError) as e:
        load_config(TINY, ["--config.optimizer.lr=-1.0", "--config.model.n_kv_heads=4"])
    message = str(e.value)
    assert "command line --config.optimizer.lr=-1.0: config.optimizer.lr = -1.0: expected a positive learning rate" in message
    assert "config.model.n_heads = 6: expected a multiple of model.n_kv_heads (4)" in message


def test_typo_in_config_file_names_file_line_and_closest_key(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text(
        "from jit_tune.config import default_config\n\n"
        "def get_config():\n"
        "    c = default_config()\n"
        "    c.optimizer.warmup_step = 3\n"
        "    return c\n"
    )
    with pytest.raises(ConfigError, match=rf"{path}:5: .*Did you mean \"warmup_steps\""):
        load_config(str(path))


def test_bad_value_in_config_file_names_its_line(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text(
        "from jit_tune.config import default_config\n\n"
        "def get_config():\n"
        "    c = default_config()\n"
        "    c.data.seq_len = 4\n"
        "    return c\n"
    )
    with pytest.raises(ConfigError, match=rf"{path}:5: config.data.seq_len = 4: expected an integer >= 8"):
        load_config(str(path))


def test_unknown_mixture_task_is_rejected():
    with pytest.raises(ConfigError, match="data.mixture.*did you mean config.data.mixture.reverse"):
        load_config(TINY, ["--config.data.mixture.revers=1.0"])


def test_missing_config_file():
    with pytest.raises(ConfigError, match="no config file at 'configs/nope.py'"):
        load_config("configs/nope.py")


def test_cli_reports_user_errors_without_traceback(tmp_path, capsys):
    code = main(["train", "--config", TINY, "--workdir", str(tmp_path / "run"), "--config.optimizer.lrr=1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "did you mean config.optimizer.lr" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # nothing is created for a rejected config


def test_resolved_config_is_saved_and_reloads(tmp_path, smoke_config):
    from jit_tune.config import config_from_dict, save_config

    save_config(smoke_config, tmp_path / "config.json")
    reloaded = config_from_dict(json.loads((tmp_path / "config.json").read_text()), "config.json")
    assert reloaded.to_dict() == smoke_config.to_dict()


def test_bad_template_in_config_file_names_its_line_and_key(tmp_path):
    data = tmp_path / "raw.jsonl"
    data.write_text('{"text": "x", "label": "y"}\n')
    path = tmp_path / "bad.py"
    path.write_text(
        "from jit_tune.config import default_config\n\n"
        "def get_config():\n"
        "    c = default_config()\n"
        f"    c.data.tasks.raw = dict(path={str(data)!r}, format='templated',\n"
        "                            templates=dict(templates=[('{{text', '{{label}}')]))\n"
        "    return c\n"
    )
    with pytest.raises(ConfigError, match=rf"{path}:6: config.data.tasks.raw.templates.templates\[0\].prompt: "
                                          "Jinja syntax error"):
        load_config(str(path))


def test_evaluation_batches_default_to_a_training_microbatch_and_refuse_negative_sizes():
    from jit_tune.eval.evaluator import eval_rows

    config = load_config(TINY, ["--config.data.batch_size=48", "--config.train.microbatches=3"])
    assert config.eval.batch_size == 0 and eval_rows(config) == 16  # fits wherever a training microbatch does
    assert eval_rows(load_config(TINY, ["--config.eval.batch_size=5"])) == 5
    with pytest.raises(ConfigError, match=r"config.eval.batch_size = -1: expected an integer >= 0"):
        load_config(TINY, ["--config.eval.batch_size=-1"])
