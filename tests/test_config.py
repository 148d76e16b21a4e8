import json
import re

import pytest

from jit_tune.config import ConfigError, config_from_dict, config_to_dict, load_config
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
    with pytest.raises(ConfigError, match="--config.train.steps=many: expected an integer"):
        load_config(TINY, ["--config.train.steps=many"])


@pytest.mark.parametrize("item, expected", [
    ("--config.model.n_kv_heads=None", "config.model.n_kv_heads = None: expected an integer"),
    ("--config.data.seq_len=None", "config.data.seq_len = None: expected an integer"),
    ("--config.eval.examples_per_task=None", "config.eval.examples_per_task = None: expected an integer"),
    ("--config.optimizer.lr=1e999", "config.optimizer.lr = inf: expected a finite number"),
    ("--config.data.mixture.sort=None", "config.data.mixture.sort = None: expected a finite rate >= 0"),
    ("--config.data.mixture.sort=1e999", "config.data.mixture.sort = inf: expected a finite rate >= 0"),
    ("--config.mesh.shape.fsdp=0", "config.mesh.shape = {'data': -1, 'fsdp': 0, 'tensor': 1}: expected positive"),
])
def test_a_bad_flag_is_named_with_the_flag_not_a_traceback(item, expected):
    with pytest.raises(ConfigError, match=re.escape(f"command line {item}: {expected}")):
        load_config(TINY, [item])


def test_a_mistyped_value_in_a_file_or_a_saved_config_is_named(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text(
        "from jit_tune.config import default_config\n\n"
        "def get_config():\n"
        "    c = default_config()\n"
        "    c.model.head_dim = None\n"
        "    c.data.mixture = dict(sort='1', reverse=1.0)\n"
        "    return c\n"
    )
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    assert f"{path}:5: config.model.head_dim = None: expected an integer" in str(e.value)
    assert f"{path}:6: config.data.mixture.sort = '1': expected a finite rate >= 0" in str(e.value)
    saved = config_to_dict(load_config(TINY))
    saved["model"]["rope_theta"] = None
    with pytest.raises(ConfigError, match=r"run/config.json: config.model.rope_theta = None: expected a finite number"):
        config_from_dict(saved, "run/config.json", check_files=False)


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
