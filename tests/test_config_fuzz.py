"""Property test of the config loader: random keys and values never produce a traceback, only a clear
ConfigError naming the key, or a valid config."""

import dataclasses
import string
import warnings

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from leantrain import config as C
from leantrain.errors import ConfigError

KNOWN_KEYS = [f"{s}.{f.name}" for s in C.SECTIONS for f in dataclasses.fields(C._section_class(s))]
keys = st.one_of(st.sampled_from(KNOWN_KEYS + ["recipe"]), st.text(string.ascii_letters + "._-", max_size=30))
cli_values = st.one_of(
    st.text(max_size=20),
    st.integers().map(str),
    st.floats().map(str),
    st.sampled_from(["true", "false", "bfloat16", "float32", "bf16-sr", "kahan", "0,0.9"]),
)
toml_values = st.one_of(
    st.text(max_size=10),
    st.integers(),
    st.floats(allow_nan=True),
    st.booleans(),
    st.lists(st.floats(), max_size=3),
    st.none(),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(keys, cli_values, max_size=4))
def test_random_command_line_overrides(overrides):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            cfg = C.load_config(None, overrides)
        except ConfigError as e:
            msg = str(e)
            assert msg and "\n" not in msg.strip()
            assert any(part in msg for k in overrides for part in (k, k.split(".")[0]))
        else:
            C.validate(cfg)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(list(C.SECTIONS) + ["recipe", "bogus"]),
        st.one_of(
            toml_values, st.dictionaries(st.text(string.ascii_lowercase + "_", max_size=15), toml_values, max_size=3)
        ),
        max_size=3,
    )
)
def test_random_toml_tables(tmp_path_factory, raw):
    import tomllib

    lines = []
    for section, body in raw.items():
        if isinstance(body, dict):
            lines.append(f"[{section}]")
            lines.extend(f"{k or 'x'} = {C._toml_value(v) if v is not None else 1}" for k, v in body.items())
        else:
            lines.insert(0, f"{section} = {C._toml_value(body) if body is not None else 1}")
    path = tmp_path_factory.mktemp("cfg") / "c.toml"
    path.write_text("\n".join(lines) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            C.load_config(str(path))
        except ConfigError as e:
            assert str(e)
        except tomllib.TOMLDecodeError:  # pragma: no cover - load_config must wrap this
            raise AssertionError("TOML errors must become ConfigError")
