"""cli: scripts' `key=value` command lines typed by a dataclass schema (parse_keys), their `--help`
(exit_on_help, keys_help), and the two helpers scripts share: pick (forward parsed keys) and
markdown_table (print a result table). The scripts' own command lines are tested with each script."""

from dataclasses import dataclass, field
from typing import Any

import pytest

import cli
from schemas import ConfigError


@dataclass
class DemoKeys:
    out: str | None = None  # where the table goes
    steps: int = 4  # solver steps
    json: bool = False
    scales: list[float] = field(default_factory=lambda: [1.0])
    model: dict[str, Any] = field(default_factory=lambda: {"name": "dit_s2"})


def test_pick_forwards_the_named_fields_in_the_order_named():
    keys = DemoKeys(out="x.md", steps=8)
    picked = cli.pick(keys, "steps", "out")
    assert picked == {"steps": 8, "out": "x.md"} and list(picked) == ["steps", "out"]
    assert cli.pick(keys) == {}
    with pytest.raises(AttributeError):
        cli.pick(keys, "stepz")


def test_markdown_table_title_header_alignment_rule_and_rows():
    table = cli.markdown_table(
        "Cost", ["stage", "hours", "usd"], [["masked", "41.84", "138.07"], ["total", "63.77", "210.45"]], "lrr"
    )
    assert table == (
        "**Cost**\n\n| stage | hours | usd |\n|---|---:|---:|\n| masked | 41.84 | 138.07 |\n| total | 63.77 | 210.45 |"
    )
    assert cli.markdown_table("Empty", ["a", "b"], [], "rl") == "**Empty**\n\n| a | b |\n|---:|---|"


def test_parse_keys_types_values_like_hydra_overrides():
    keys = cli.parse_keys(["steps=8", "scales=[0.5,4]", "out=null", "json=true"], DemoKeys)
    assert keys == DemoKeys(out=None, steps=8, json=True, scales=[0.5, 4.0])
    assert cli.parse_keys([], DemoKeys) == DemoKeys()


def test_parse_keys_named_keys_spellings_and_passthrough():
    keys = cli.parse_keys(["model=dit_b2", "model.depth=4"], DemoKeys, named=("model",))
    assert keys.model == {"name": "dit_b2", "depth": 4}
    assert cli.parse_keys(["solver.steps=2"], DemoKeys, spellings={"solver.steps": "steps"}).steps == 2
    keys, rest = cli.parse_keys(["steps=2", "training.lr=0.1", "out=x", "seed=3"], DemoKeys, passthrough=True)
    assert (keys.steps, keys.out, rest) == (2, "x", ["training.lr=0.1", "seed=3"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "2"], "argument '--steps' is not key=value; keys: out, steps, json, scales, model"),
        (["=2"], "argument '=2' is not key=value; keys: "),
        (["stepz=1"], "unknown config key 'stepz'; allowed keys under '<root>': out, steps, json, scales, model"),
        (["steps=many"], "config key 'steps' has a value of the wrong type: "),
        (["scales=[1,inf]"], "scales[1] = inf: must be finite"),
    ],
    ids=["flag", "no_key", "unknown_key", "wrong_type", "non_finite"],
)
def test_parse_keys_refuses_with_one_line_naming_the_argument(argv, message):
    with pytest.raises(ConfigError) as error:
        cli.parse_keys(argv, DemoKeys)
    assert str(error.value).startswith(message) and "\n" not in str(error.value), str(error.value)


def test_help_prints_the_docstring_and_each_key_with_its_type_default_and_comment(capsys):
    assert cli.keys_help(DemoKeys).splitlines()[:3] == [
        f"{'  out: str | None = null':<48} where the table goes",
        f"{'  steps: int = 4':<48} solver steps",
        "  json: bool = false",
    ]
    for flag in cli.HELP_FLAGS:
        with pytest.raises(SystemExit) as exit_info:
            cli.parse_keys(["steps=2", flag], DemoKeys, "Demo script.\n\nMore words.\n")
        assert exit_info.value.code == 0
        assert (
            capsys.readouterr().out == f"Demo script.\n\nMore words.\n\nkeys (key=value):\n{cli.keys_help(DemoKeys)}\n"
        )
    with pytest.raises(SystemExit):
        cli.exit_on_help(["-h"], None, ("presets", "a, b"))
    assert capsys.readouterr().out == "presets:\na, b\n"
    assert cli.exit_on_help(["steps=2"], "Demo.", ("keys", DemoKeys)) is None and capsys.readouterr().out == ""
