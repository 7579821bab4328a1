"""The preset catalogue of configs/experiment/: which presets each training entry point takes (told
apart by structure), the one-line error for a wrong `experiment=`, and the entry points' `--help`."""

import dataclasses
from pathlib import Path

from omegaconf import OmegaConf

from schemas import Config, ConfigError, GRPORunConfig, check_choice

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


# The entry point each kind of preset is for, by primary config.
PRESET_KINDS = {"config": "train", "config_grpo": "grpo"}
PRESET_SCRIPTS = {"train": "train.py", "grpo": "train_grpo.py"}


def preset_kind(name: str) -> str:
    """'grpo' for a train_grpo.py preset, 'train' for a train.py one, told apart by structure: a GRPO
    preset sets or overrides a section that only GRPORunConfig has (grpo, reward, seed_checkpoint), or
    extends a preset that does."""
    path = CONFIG_DIR / "experiment" / f"{name}.yaml"
    if not path.is_file():
        return "train"
    node = OmegaConf.to_container(OmegaConf.load(path)) or {}
    grpo_only = {f.name for f in dataclasses.fields(GRPORunConfig)} - {f.name for f in dataclasses.fields(Config)}
    keys, parents = set(node) - {"defaults"}, []
    for entry in node.get("defaults") or []:
        if isinstance(entry, str) and entry != "_self_":  # another preset of the group, which this one extends
            parents.append(entry.removeprefix("/experiment/"))
        elif isinstance(entry, dict):  # `override /reward: jpeg` sets the reward section
            keys |= {key.removeprefix("override").strip().lstrip("/").partition("@")[0] for key in entry}
    if keys & grpo_only:
        return "grpo"
    return "grpo" if any(preset_kind(parent) == "grpo" for parent in parents if "/" not in parent) else "train"


def presets(kind: str = "train") -> list[str]:
    """The selectable presets for train.py (kind 'train') or train_grpo.py ('grpo'). A file whose name
    starts with '_' is a base that presets extend (its shared settings), never a preset itself."""
    return sorted(
        p.stem
        for p in (CONFIG_DIR / "experiment").glob("*.yaml")
        if not p.stem.startswith("_") and preset_kind(p.stem) == kind
    )


def check_preset(overrides: list[str], config_name: str) -> None:
    """`experiment=NAME` must name a preset of this entry point: one line naming the right entry point
    for the other kind's preset, or the allowed presets for an unknown name or a base."""
    if config_name not in PRESET_KINDS:
        return
    name = _experiment_choice(overrides)
    if name is None:
        return
    kind = PRESET_KINDS[config_name]
    if name in presets(kind):
        return
    if not name.startswith("_") and (CONFIG_DIR / "experiment" / f"{name}.yaml").is_file():
        if preset_kind(name) == "grpo":
            raise ConfigError(
                f"experiment={name} is a Flow-GRPO preset (it has a grpo/reward section), for train_grpo.py: "
                f"python train_grpo.py experiment={name} seed_checkpoint=RUN_DIR"
            )
        raise ConfigError(
            f"experiment={name} is a training preset, for train.py (python train.py experiment={name}); "
            f"train_grpo.py takes a GRPO preset: {', '.join(presets('grpo'))}"
        )
    check_choice("experiment", name, presets(kind))


def _experiment_choice(overrides: list[str]) -> str | None:
    """The preset an `experiment=NAME` override picks (the last one); None when there is none, or when
    the overrides do not parse (Hydra's own message then says why)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException:
        return None
    values = [o.value() for o in parsed if o.key_or_group == "experiment" and o.package is None and not o.is_delete()]
    return values[-1] if values and isinstance(values[-1], str) else None


def entry_point_help(kind: str) -> list[tuple[str, str]]:
    """The `--help` sections of train.py (kind 'train') or train_grpo.py ('grpo'): the presets, and each
    config group's options (GROUP=OPTION), listed from configs/."""
    # the seed checkpoint fixes a GRPO run's data, model and flow; rewards are GRPO's alone
    skip = {
        "experiment",
        "inference",
        "eval",
        "pairs",
        *(("dataset", "model", "flow") if kind == "grpo" else ("reward",)),
    }
    groups = {
        d.name: sorted(p.stem for p in d.glob("*.yaml"))
        for d in sorted(CONFIG_DIR.iterdir())
        if d.is_dir() and d.name not in skip
    }
    lines = "\n".join(f"  {name}: {', '.join(options)}" for name, options in groups.items())
    return [
        ("presets (experiment=NAME)", "  " + ", ".join(presets(kind))),
        ("config groups (GROUP=OPTION)", lines),
        ("keys", "  any key of the composed config as key=value (training.lr=3e-4); schemas.py lists them"),
    ]
