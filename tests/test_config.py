import pytest
import yaml

from stepdistill.config import ConfigError, OptimConfig

from stepdistill.trainers import load_config, resolve
from tiny import tiny_teacher_raw


def write(tmp_path, raw):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_yaml_and_dotted_overrides(tmp_path):
    path = write(tmp_path, tiny_teacher_raw(tmp_path / "run"))
    run = load_config(path, ["train.max_steps=7", "optim.model.lr=1e-5", f"output_dir={tmp_path}/x",
                             "model.backbone_config.layers_per_block=2"])
    assert run.train.max_steps == 7
    assert run.optim["model"].lr == pytest.approx(1e-5)  # YAML reads '1e-5' as a string: coerced
    assert run.output_dir == f"{tmp_path}/x"
    assert run.model.backbone_config["layers_per_block"] == 2
    assert run.objective.label_dropout == 0.1  # the method's own defaults
    assert isinstance(run.optim["model"], OptimConfig)


def test_every_recipe_in_configs_resolves():
    import pathlib

    for path in sorted(pathlib.Path("configs").glob("*.yaml")):
        run = load_config(path, ["train.max_steps=1"])
        assert run.output_dir and run.train.max_steps == 1


@pytest.mark.parametrize("override, message", [
    ("train.max_stepz=3", "unknown key 'train.max_stepz'"),
    ("train.max_steps=abc", "train.max_steps: expected an integer"),
    ("train.mixed_precision=fp8", "choose one of 'no', 'fp16', 'bf16'"),
    ("optim.critic.lr=1", "method 'teacher' has the phases: model"),
    ("objective.label_dropout=1.5", "objective.label_dropout must be in [0, 1)"),
    ("objective.nope=1", "unknown key 'objective.nope'"),
    ("method=dmd9", "unknown method 'dmd9'"),
    ("train.ema_warmup=maybe", "expected true or false"),
    ("optim.model.betas=[0.9]", "expected 2 values"),
])
def test_bad_values_name_the_key(tmp_path, override, message):
    path = write(tmp_path, tiny_teacher_raw(tmp_path / "run"))
    with pytest.raises(ConfigError) as err:
        load_config(path, [override])
    assert message in str(err.value)


def test_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["train.max_steps"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_unknown_top_level_key_lists_allowed():
    with pytest.raises(ConfigError) as err:
        resolve({"method": "teacher", "outptu_dir": "x"})
    assert "outptu_dir" in str(err.value) and "output_dir" in str(err.value)


def test_a_bare_yaml_no_is_the_string_no(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  mixed_precision: no\n")
    assert load_config(path).train.mixed_precision == "no"
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"


@pytest.mark.parametrize("override, allowed", [
    ("train.batch_size=0", ">= 1"), ("train.max_steps=0", ">= 1"), ("train.max_steps=-5", ">= 1"),
    ("train.grad_accum=0", ">= 1"), ("train.log_every=0", ">= 1"), ("train.checkpoint_every=-1", ">= 0"),
    ("train.ema_decay=1", "< 1"), ("train.threads=0", ">= 1"), ("optim.model.lr=-1e-4", "> 0"),
    ("optim.model.every=0", ">= 1"), ("optim.model.betas=[0.9,1.5]", "< 1"), ("optim.model.warmup_steps=-1", ">= 0"),
    ("optim.model.max_grad_norm=0", "> 0"), ("data.resolution=0", ">= 1")])
def test_numbers_out_of_range_are_one_clear_line_before_anything_loads(tmp_path, capsys, override, allowed):
    from stepdistill.cli import main

    path = write(tmp_path, tiny_teacher_raw(tmp_path / "run"))
    with pytest.raises(ConfigError, match=f"{override.split('=')[0]}=.* out of range: it must be .*{allowed}"):
        load_config(path, [override])
    assert main(["train-teacher", str(path), override]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "out of range" in err and not (tmp_path / "run").exists()
