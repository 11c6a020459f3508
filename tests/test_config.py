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
    p.write_text('[training]\nsteps = 7\ndtype = "float32"\nmixed_precision_param = "float32"\n'
                 '[optimizer]\nlr = 0.01\ncompensation = "none"\n')
    cfg = load_config(str(p), {"training.steps": "9", "optimizer.betas": "0.8,0.9"})
    assert cfg.training.steps == 9 and cfg.optimizer.lr == 0.01 and cfg.optimizer.betas == (0.8, 0.9)
    assert recipe_of(cfg) == "fp32"


@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe_equals_its_keys(name):
    by_recipe = load_config(None, {"recipe": name})
    by_keys = load_config(None, {k: str(v) for k, v in RECIPES[name].items()})
    assert recipe_of(by_recipe) == recipe_of(by_keys) == name
    assert dataclasses.replace(by_recipe, recipe="") == by_keys


@pytest.mark.parametrize("overrides, words", [
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
])
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
    cfg = load_config(None, {"recipe": "bf16-kahan", "training.steps": "5", "job.dump_folder": "a \"b\""})
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
