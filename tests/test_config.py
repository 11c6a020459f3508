"""Config: loading, overriding, validation messages, warnings, --help."""

import dataclasses
import warnings

import pytest

from leantrain import config as C
from leantrain.config import ConfigError, load_config
from leantrain.config import RECIPES, recipe_of


def test_defaults_are_valid_and_are_the_best_8_byte_recipe():
    cfg = load_config()
    assert cfg.training.dtype == "bfloat16"
    assert recipe_of(cfg) == "bf16-sr"


def test_toml_then_cli_priority(tmp_path):
    p = tmp_path / "run.toml"
    p.write_text(
        '[training]\nsteps = 7\ndtype = "float32"\nmixed_precision_param = "float32"\n'
        '[optimizer]\nlr = 0.01\ncompensation = "none"\n'
    )
    cfg = load_config(str(p), {"training.steps": "9", "optimizer.betas": "0.8,0.9"})
    assert cfg.training.steps == 9 and cfg.optimizer.lr == 0.01 and cfg.optimizer.betas == (0.8, 0.9)
    assert recipe_of(cfg) == "fp32"


@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe_equals_its_keys(name):
    by_recipe = load_config(None, {"recipe": name})
    by_keys = load_config(None, {k: str(v) for k, v in RECIPES[name].items()})
    assert recipe_of(by_recipe) == recipe_of(by_keys) == name
    assert dataclasses.replace(by_recipe, recipe="") == by_keys


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"training.stepz": "3"}, ["training.stepz", "Did you mean 'training.steps'"]),
        ({"trainin.steps": "3"}, ["trainin", "Did you mean 'training'"]),
        ({"training.steps": "three"}, ["training.steps", "'three'", "an integer"]),
        ({"training.steps": "0"}, ["training.steps", "at least 1"]),
        ({"training.dtype": "float16"}, ["training.dtype", "'float16'", "'float32', 'bfloat16'"]),
        ({"optimizer.compensation": "kahn"}, ["optimizer.compensation", "Did you mean 'kahan'"]),
        ({"optimizer.betas": "0.9,1.5"}, ["optimizer.betas", "[0, 1)"]),
        ({"optimizer.lr": "-1"}, ["optimizer.lr", "positive"]),
        ({"recipe": "bf16-fast"}, ["recipe", "bf16-fast", "bf16-sr"]),
        ({"recipe": "fp32", "training.dtype": "bfloat16"}, ["recipe 'fp32'", "training.dtype"]),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(overrides, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    for w in words:
        assert w in str(e.value)


def test_bad_toml_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("[training\nsteps=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(str(bad))
    typed = tmp_path / "typed.toml"
    typed.write_text('[training]\nsteps = "10"\n')  # a string where TOML can say an integer
    with pytest.raises(ConfigError, match="an integer"):
        load_config(str(typed))


def test_suspicious_settings_warn_once():
    C._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_config(None, {"training.mixed_precision_param": "float32"})
        load_config(None, {"training.mixed_precision_param": "float32"})
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1 and "training.dtype=bfloat16" in msgs[0] and "mixed_precision_param" in msgs[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_config(None, {"training.dtype": "float32", "optimizer.compensation": "kahan"})
        load_config(None, {"training.steps": "10", "lr_scheduler.warmup_steps": "20"})
    assert any("no effect" in str(w.message) for w in caught)
    assert any("never reaches" in str(w.message) for w in caught)


def test_resolved_config_round_trips_through_toml(tmp_path):
    cfg = load_config(None, {"recipe": "bf16-kahan", "training.steps": "5", "job.dump_folder": 'a "b"'})
    p = tmp_path / "config.toml"
    p.write_text(C.to_toml(cfg))
    assert load_config(str(p)) == cfg


def test_every_field_is_documented_in_help():
    text = C.help_text()
    for section in C.SECTIONS:
        cls = C._section_class(section)
        docs = C.field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{section}.{f.name} has no docstring"
            assert f"--{section}.{f.name}" in text


@pytest.mark.parametrize(
    "key, value, says",
    [
        ("data.path", "", "current directory"),
        ("data.path", "  ", "current directory"),
        ("job.seed", "100000000000000000000000", "2**63"),
        ("job.seed", "-1", "2**63"),
        ("optimizer.weight_decay", "inf", "optimizer.weight_decay"),
        ("optimizer.eps", "inf", "optimizer.eps"),
        ("training.max_norm", "inf", "training.max_norm"),
        ("model.rope_theta", "nan", "model.rope_theta"),
    ],
)
def test_values_that_would_fail_later_or_silently_are_refused_up_front(key, value, says, capsys):
    from leantrain.cli import main

    with pytest.raises(ConfigError, match=says.replace("*", r"\*")):
        load_config(None, {key: value})
    assert main(["train", f"--{key}={value}"]) == 2  # before any work: the message, no traceback
    err = capsys.readouterr().err
    assert err.startswith("leantrain: error:") and key in err and "Traceback" not in err


def test_fp32_storage_with_bf16_compute_outside_the_recipe_warns():
    C._warned.clear()
    with pytest.warns(UserWarning, match="compute in bfloat16"):
        load_config(None, {"training.dtype": "float32", "optimizer.state_dtype": "float32"})  # not bf16-mixed
    C._warned.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the recipe asks for exactly that: no warning
        load_config(None, {"recipe": "bf16-mixed", "lr_scheduler.warmup_steps": "0", "training.steps": "10"})


def test_compare_refuses_a_recipe_named_twice_and_export_an_existing_file(tmp_path, capsys):
    from leantrain.cli import main

    assert main(["compare", "--recipes", "bf16,bf16", "--out", str(tmp_path / "c")]) == 2
    assert "bf16 more than once" in capsys.readouterr().err and not (tmp_path / "c").exists()
    target = tmp_path / "model.bin"
    target.write_text("keep me")
    assert main(["export", "--checkpoint", str(tmp_path), "--out", str(target)]) == 2
    assert "existing file" in capsys.readouterr().err and target.read_text() == "keep me"
