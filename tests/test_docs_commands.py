"""Every command shown in README.md and docs/*.md parses, checked in-process without running anything.

A command is a line in a fenced code block that starts (after `VAR=value` environment assignments) with
`uv run python`, `python`, `python3`, `torchrun` or `uv run torchrun`; lines ending in `\\` continue it,
`# ...` ends it. How each is dry-run:
- the entry points (`train.py`, `train_grpo.py`, `inference.py`, `eval_imagenet.py`) take Hydra
  key=value overrides: their config is composed, typed and validated exactly as their `main` does
  before it touches a checkpoint or a device;
- the key=value scripts run `main(args)` until `cli.parse_keys` has parsed and typed their keys (a
  benchmark's pass-through train.py overrides are composed and validated with `config.load_config`);
- argparse scripts run `main([... "--help"])` (exit 0), and every `--flag` the doc writes must be an
  option of the parser, or of the sub-command's parser, that the script builds.
A command for which none of these applies fails, so a new kind of command needs a strategy here.
Placeholders the docs use in place of values are replaced through PLACEHOLDERS before parsing.
"""

import argparse
import re
import shlex
from pathlib import Path
from unittest import mock

import pytest

import cli
import config
from conftest import ROOT, load_script

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
STARTS = re.compile(r"^(?:[A-Z_][A-Z0-9_]*=\S*\s+)*(?:uv run )?(?:python3?|torchrun)\s")
# Doc placeholders -> a value that parses. Exact substrings of the documented commands.
PLACEHOLDERS = {
    "experiment=NAME": "experiment=moons_cfg",  # benchmarks.md: any preset
    " [any train.py override]": "",  # benchmarks.md: free text standing for more overrides
    "batch=B": "batch=64",  # benchmarks.md: a batch size
    # imagenet256_storage.md: "the keys of the command above", then shell arithmetic for one rank
    "build ... rank=$((m*8+g)) world=$((M*8)) device=cuda:$g": (
        "build images=IMAGES out=OUT rank=9 world=16 device=cuda:1"
    ),
}
# Documented commands that cannot be dry-run here, each with its reason.
SKIPPED = {
    'uv run python -c "import sky; print(sky.__version__)"': "an installation check, not a project command",
}


def documented_commands() -> list[tuple[str, str]]:
    """(where, command) for every command in a fenced code block of README.md and docs/*.md."""
    found = []
    for doc in DOCS:
        in_block, current, start = False, None, 0
        for number, line in enumerate(doc.read_text().splitlines(), 1):
            text = line.strip()
            if text.startswith("```"):
                in_block, current = not in_block, None
                continue
            if not in_block:
                continue
            if current is None:
                if not STARTS.match(text):
                    continue
                current, start = "", number
            current += " " + text.removesuffix("\\").strip()
            if not text.endswith("\\"):
                found.append((f"{doc.relative_to(ROOT)}:{start}", current.strip()))
                current = None
    return found


COMMANDS = documented_commands()


def split_command(command: str) -> tuple[str, list[str]]:
    """-> (the .py file run, its arguments): placeholders replaced, comments and environment
    assignments dropped, the launcher's own options (`torchrun --nproc_per_node=8`) skipped, and the
    brackets of optional groups (`[--quick]`, `[--keep-mapped | --cold]`) removed so their contents count."""
    for placeholder, value in PLACEHOLDERS.items():
        command = command.replace(placeholder, value)
    tokens = shlex.split(command, comments=True)
    while tokens and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", tokens[0]):
        tokens.pop(0)
    script = next((i for i, token in enumerate(tokens) if token.endswith(".py")), None)
    assert script is not None, f"no .py file in {command!r}: add a strategy or a SKIPPED entry with its reason"
    args, depth = [], 0
    for token in tokens[script + 1 :]:
        if depth == 0 and token.startswith("["):
            depth, token = 1, token[1:]
        if depth and token.endswith("]") and token.count("[") < token.count("]"):
            depth, token = 0, token[:-1]
        if token and token != "|":
            args.append(token)
    return tokens[script], args


def dry_inference(args):
    cfg = config.apply_schema(config.compose(args, config_name="inference"), config.InferenceConfig)
    config.validate_inference(cfg)
    config.solver_overrides(cfg)


def dry_eval(args):
    config.validate_eval(config.apply_schema(config.compose(args, config_name="eval"), config.EvalConfig))


ENTRY_POINTS = {
    "train.py": config.load_config,
    "train_grpo.py": config.load_grpo_config,
    "inference.py": dry_inference,
    "eval_imagenet.py": dry_eval,
}


class Parsed(Exception):
    """Raised by the stand-in for cli.parse_keys once a script's arguments have parsed."""


def dry_key_value(module, args):
    """Run the script's main until its key=value arguments are parsed and typed by cli.parse_keys;
    the overrides a benchmark passes through to train.py are composed and validated too."""
    real = cli.parse_keys

    def parse_then_stop(*a, **kw):
        result = real(*a, **kw)
        if kw.get("passthrough"):
            config.load_config(result[1])
        raise Parsed

    with mock.patch.object(module, "parse_keys", parse_then_stop), pytest.raises(Parsed):
        module.main(args)


class ParserBuilt(Exception):
    """Raised by the stand-in for ArgumentParser.parse_known_args once the parser is built."""


def built_parser(module) -> argparse.ArgumentParser | None:
    """The top-level ArgumentParser that `module.main` builds, caught as it starts parsing."""
    built = []

    def capture(self, args=None, namespace=None):
        built.append(self)
        raise ParserBuilt

    with mock.patch.object(argparse.ArgumentParser, "parse_known_args", capture):
        try:
            module.main(["--help"])
        except ParserBuilt:
            pass
    return built[0] if built else None


def option_strings(parser: argparse.ArgumentParser, args: list[str]) -> tuple[set[str], list[str]]:
    """The options of `parser`, plus those of the sub-command `args` names, and that sub-command."""
    options = {s for action in parser._actions for s in action.option_strings}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            command = next((a for a in args if not a.startswith("-")), None)
            assert command in action.choices, f"sub-command {command!r} is not one of {sorted(action.choices)}"
            return options | {s for a in action.choices[command]._actions for s in a.option_strings}, [command]
    return options, []


def test_the_docs_show_commands():
    assert len(COMMANDS) >= 30, [c for _, c in COMMANDS]  # the extraction found the docs' commands
    assert all(c in (c for _, c in COMMANDS) for c in SKIPPED), "a SKIPPED entry no longer matches a command"


@pytest.mark.parametrize(("where", "command"), COMMANDS, ids=[where for where, _ in COMMANDS])
def test_documented_command_parses(where, command, capsys):
    if command in SKIPPED:
        pytest.skip(SKIPPED[command])
    script, args = split_command(command)
    name = Path(script).name
    if Path(script).parent == Path(".") and name in ENTRY_POINTS:
        ENTRY_POINTS[name](args)
        return
    assert Path(script).parent == Path("scripts") and (ROOT / script).is_file(), f"{where}: no such script {script}"
    module = load_script(Path(script).stem)
    if hasattr(module, "parse_keys"):
        dry_key_value(module, args)
        return
    parser = built_parser(module)
    assert parser is not None, f"{where}: {script} builds no ArgumentParser and uses no cli.parse_keys"
    options, command_path = option_strings(parser, args)
    with pytest.raises(SystemExit) as exit_info:
        module.main([*command_path, "--help"])
    assert exit_info.value.code == 0, f"{where}: {script} --help exited {exit_info.value.code}"
    assert capsys.readouterr().out.startswith("usage:")
    unknown = [a.partition("=")[0] for a in args if a.startswith("--") and a.partition("=")[0] not in options]
    assert not unknown, f"{where}: {script} has no option {unknown} (its options: {sorted(options)})"
