"""schemas: typing a composed config against its dataclass schema (unknown keys, wrong types and
non-finite floats fail naming the key), and the checks of a `{name: ..., **kwargs}` spec against the
registry entry's arguments."""

import re
from dataclasses import dataclass, field

import pytest
from omegaconf import OmegaConf

from config import load_config
from schemas import ConfigError, apply_schema, check_spec


@pytest.mark.parametrize(
    "override",
    ["training.lr=inf", "training.weight_decay=inf", "training.betas=[0.9,nan]", "flow.denominator_min=-inf"],
)
def test_a_non_finite_float_anywhere_in_a_training_config_is_refused(override):
    """training.lr=inf used to write a sha-verified checkpoint of NaN weights before failing."""
    key = override.partition("=")[0]
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}(\[1\])? = .*must be finite"):
        load_config([override])


@pytest.mark.parametrize("key", ["grpo.lr", "grpo.noise_level", "grpo.guidance_scale", "grpo.kl_beta"])
def test_a_non_finite_grpo_setting_is_refused(key):
    """grpo.noise_level=inf and the like used to finish with exit 0, every update skipped."""
    from config import load_grpo_config

    with pytest.raises(ConfigError, match=rf"^{key} = inf: must be finite"):
        load_grpo_config(["experiment=fashion_grpo_jpeg", "seed_checkpoint=RUN", f"{key}=inf"])


@dataclass
class Inner:
    rate: float = 0.1
    sizes: list[float] = field(default_factory=lambda: [1.0, 2.0])


@dataclass
class Outer:
    name: str = "a"
    inner: Inner = field(default_factory=Inner)


def test_apply_schema_fills_defaults_and_names_the_key_it_refuses():
    cfg = apply_schema(OmegaConf.create({"inner": {"rate": 0.5}}), Outer)
    assert OmegaConf.to_container(cfg) == {"name": "a", "inner": {"rate": 0.5, "sizes": [1.0, 2.0]}}
    cases = [
        ({"nme": "b"}, "unknown config key 'nme'; allowed keys under '<root>': name, inner"),
        ({"inner": {"rat": 1.0}}, "unknown config key 'inner.rat'; allowed keys under 'inner': rate, sizes"),
        ({"inner": {"rate": "fast"}}, "config key 'inner.rate' has a value of the wrong type: "),
        ({"inner": {"rate": float("-inf")}}, "inner.rate = -inf: must be finite"),
        ({"inner": {"sizes": [1.0, float("nan")]}}, "inner.sizes[1] = nan: must be finite"),
    ]
    for values, message in cases:
        with pytest.raises(ConfigError) as error:
            apply_schema(OmegaConf.create(values), Outer)
        assert str(error.value).startswith(message), (values, str(error.value))


def widget(width: int = 8, depth: int = 0, scale: float = 1.0, mode: str | None = None):
    """A registry entry: a positive-default int (a size), a zero-default int, a float and an optional str."""


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"width": 4}, "model must be a mapping with a 'name' key; choose one of: widget"),
        ({"name": "gadget"}, "model.name = 'gadget' is not allowed; choose one of: widget"),
        ({"name": "widget", "height": 3}, "model.height is not an argument of model 'widget'; allowed: width, depth, "),
        ({"name": "widget", "width": 0}, "model.width = 0: must be >= 1"),
        ({"name": "widget", "depth": -1}, "model.depth = -1: must be >= 0"),
        ({"name": "widget", "width": True}, "model.width = True: must be int"),
        ({"name": "widget", "scale": "big"}, "model.scale = 'big': must be float"),
        ({"name": "widget", "scale": float("inf")}, "model.scale = inf: must be finite"),
        ({"name": "widget", "mode": 3}, "model.mode = 3: must be str | None"),
    ],
    ids=[
        "no_name",
        "unknown_name",
        "unknown_argument",
        "zero_size",
        "negative_count",
        "bool_for_int",
        "str_for_float",
        "inf",
        "int_for_str",
    ],
)
def test_check_spec_names_the_argument_and_what_is_allowed(spec, message):
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
        check_spec("model", spec, {"widget": widget})


def test_check_spec_accepts_a_fitting_spec_and_refuses_a_skipped_argument():
    check_spec("model", {"name": "widget", "width": 1, "depth": 0, "scale": 2, "mode": None}, {"widget": widget})
    with pytest.raises(
        ConfigError, match=r"^model.mode is not an argument of model 'widget'; allowed: width, depth, scale$"
    ):
        check_spec("model", {"name": "widget", "mode": "x"}, {"widget": widget}, skip=("mode",))
