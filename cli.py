"""Scripts' command lines: `key=value` arguments typed by a dataclass schema, the way the entry points
read theirs (Hydra's value syntax, schemas.apply_schema's checks), with `--help` listing the keys.

    cfg = parse_keys(argv, MyScriptKeys, __doc__)      # -> a MyScriptKeys instance, or one ConfigError
"""

import dataclasses
import inspect
import re
import typing

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from schemas import ConfigError, _describe, apply_schema

HELP_FLAGS = ("-h", "--help")


def pick(args, *names: str) -> dict:
    """{name: args.<name>} for the named fields of parsed arguments, to forward as keyword arguments."""
    return {name: getattr(args, name) for name in names}


def markdown_table(title: str, columns: list[str], rows: list[list[str]], align: str) -> str:
    """A bold title and a markdown table; align holds one character per column: 'l' or 'r'."""
    rule = "|" + "".join("---:|" if a == "r" else "---|" for a in align)
    return "\n".join(
        [f"**{title}**", "", "| " + " | ".join(columns) + " |", rule, *("| " + " | ".join(r) + " |" for r in rows)]
    )


def keys_help(schema, prefix: str = "") -> str:
    """One line per key of a dataclass schema: `name: type = default  comment`, the comment being the
    one beside the field in its source."""
    comments = {}
    for owner in reversed(schema.__mro__):
        try:
            comments.update(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.+)$", inspect.getsource(owner), re.M))
        except (OSError, TypeError):
            pass
    hints = typing.get_type_hints(schema)
    lines = []
    for f in dataclasses.fields(schema):
        if f.default is not dataclasses.MISSING:
            default = f.default
        else:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else "required"
        default = "null" if default is None else str(default).lower() if isinstance(default, bool) else default
        line = f"  {prefix}{f.name}: {_describe(hints[f.name])} = {default}"
        lines.append(f"{line:<48} {comments.get(f.name, '')}".rstrip())
    return "\n".join(lines)


def exit_on_help(argv: list[str], doc: str | None, *sections: tuple[str, object]) -> None:
    """`-h` / `--help` among a script's arguments: print its docstring, then each (title, schema)
    section's keys (a plain string is printed as it is), and exit 0."""
    if not any(arg in HELP_FLAGS for arg in argv):
        return
    parts = [(doc or "").strip()]
    for title, schema in sections:
        parts.append(f"{title}:\n{keys_help(schema) if dataclasses.is_dataclass(schema) else schema}")
    print("\n\n".join(p for p in parts if p))
    raise SystemExit(0)


def parse_keys(
    argv: list[str],
    schema,
    doc: str | None = None,
    *,
    spellings: dict[str, str] | None = None,
    named: tuple[str, ...] = (),
    passthrough: bool = False,
):
    """A script's `key=value` arguments -> an instance of the dataclass `schema`, the way the entry points
    read theirs: values parsed as in Hydra overrides (`null`, `true`, `[0.5,4]`), merged into the typed
    schema, so an unknown key or a wrong type is one ConfigError naming the key and what is allowed.
    `-h` / `--help` prints `doc` and the keys, then exits 0. `spellings` maps other names of a key (the
    training commands' `dataset.root`) to the schema's. With `passthrough`, arguments whose key is not
    the schema's are returned too, in order (-> (cfg, rest)): the training overrides of a benchmark.
    A `named` key is a `{name: ..., **kwargs}` spec as in the training configs: `model=NAME` is short for
    `model.name=NAME`, so `model=NAME model.depth=4` works."""
    exit_on_help(argv, doc, ("keys (key=value)", schema))
    names = [f.name for f in dataclasses.fields(schema)]
    mine, rest = [], []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or not key:
            raise ConfigError(f"argument {arg!r} is not key=value; keys: {', '.join(names)}")
        key = (spellings or {}).get(key, key)
        if key in named:
            key = f"{key}.name"
        if passthrough and key.split(".")[0] not in names:
            rest.append(arg)
        else:
            mine.append(f"{key}={value}")
    try:
        cfg = OmegaConf.from_dotlist(mine)
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot parse arguments {' '.join(mine)}: {e}; write them as key=value") from None
    cfg = OmegaConf.to_object(apply_schema(cfg, schema))
    return (cfg, rest) if passthrough else cfg
