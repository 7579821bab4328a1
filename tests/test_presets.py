"""The presets of configs/experiment/ state only what differs: each one composes and validates, no key
or group override in a preset (or in a `_base_*` file that presets extend) restates what the config
would hold without it, and the option files of the typed groups (solver/, flow/) hold only what differs
from their schema's defaults. GRPO presets are told from training presets by structure."""

import dataclasses
import shutil

import pytest
from omegaconf import OmegaConf

import config
import presets as catalogue
from config import ConfigError, SolverConfig, load_config, load_grpo_config
from presets import CONFIG_DIR, preset_kind, presets
from schemas import FlowConfig

EXPERIMENTS = CONFIG_DIR / "experiment"
FILES = sorted(p.stem for p in EXPERIMENTS.glob("*.yaml"))  # presets and bases
PRIMARY = {"train": "config", "grpo": "config_grpo"}


def required(name):
    """The keys a preset leaves to the command line (a second stage's start, a reflow pair directory)."""
    if preset_kind(name) == "grpo":
        return ["seed_checkpoint=runs/seed"]
    stage = ["training.init.checkpoint=runs/stage1"] if "unmasked" in name else []
    return stage + (["training.coupling.pairs=runs/pairs"] if "reflow" in name or "distill" in name else [])


def test_presets_are_listed_by_kind_and_bases_are_not_presets():
    train, grpo = presets("train"), presets("grpo")
    assert {"moons_cfg", "fashion_cfg", "imagenet256_latent_dit_xl2"} <= set(train)
    assert {"fashion_grpo_jpeg", "digits_grpo_jpeg", "fashion_grpo_trouser"} <= set(grpo)
    assert not set(train) & set(grpo)
    bases = [name for name in FILES if name.startswith("_")]
    assert bases and sorted(train + grpo + bases) == FILES


@pytest.mark.parametrize("name", presets("train") + presets("grpo"))
def test_every_preset_composes_and_validates(name):
    load = load_grpo_config if preset_kind(name) == "grpo" else load_config
    assert load([f"experiment={name}", *required(name)]).experiment == name


def test_a_preset_of_the_other_entry_point_is_one_clear_line():
    with pytest.raises(ConfigError) as error:
        load_config(["experiment=fashion_grpo_jpeg"])
    message = str(error.value)
    assert (
        "\n" not in message
        and "GRPO preset" in message
        and "python train_grpo.py experiment=fashion_grpo_jpeg" in message
    )
    with pytest.raises(ConfigError) as error:
        load_grpo_config(["experiment=fashion_cfg", "seed_checkpoint=x"])
    message = str(error.value)
    assert "\n" not in message and "training preset" in message and "python train.py experiment=fashion_cfg" in message
    assert "fashion_grpo_jpeg" in message
    # an unknown name or a base: the presets of this entry point, and only those
    for name in ("nope", next(name for name in FILES if name.startswith("_"))):
        with pytest.raises(ConfigError) as error:
            load_config([f"experiment={name}"])
        assert name in str(error.value) and "moons_cfg" in str(error.value) and "grpo" not in str(error.value)
    with pytest.raises(ConfigError) as error:
        load_grpo_config(["experiment=nope", "seed_checkpoint=x"])
    assert "fashion_grpo_jpeg" in str(error.value) and "moons_cfg" not in str(error.value)


def test_grpo_presets_are_recognised_by_structure_not_name(tmp_path, monkeypatch):
    shutil.copytree(CONFIG_DIR, tmp_path / "configs")
    for module in (config, catalogue):  # composition reads config's, the catalogue its own
        monkeypatch.setattr(module, "CONFIG_DIR", tmp_path / "configs")
    experiments = tmp_path / "configs" / "experiment"
    (experiments / "png_recipe.yaml").write_text("# @package _global_\ndefaults:\n  - override /reward: png\n")
    (experiments / "png_recipe_long.yaml").write_text(
        "# @package _global_\ndefaults:\n  - png_recipe\n\ngrpo:\n  epochs: 7\n"
    )
    (experiments / "grpo_named_trainer.yaml").write_text("# @package _global_\ntraining:\n  epochs: 3\n")
    assert preset_kind("png_recipe") == preset_kind("png_recipe_long") == "grpo"
    assert preset_kind("grpo_named_trainer") == "train"
    assert load_grpo_config(["experiment=png_recipe_long", "seed_checkpoint=x"]).grpo.epochs == 7
    assert load_config(["experiment=grpo_named_trainer"]).training.epochs == 3


# --- nothing restated -------------------------------------------------------------------------------------


def read(path):
    """(first line: the `# @package` header, the file as plain containers, as Hydra reads it)."""
    return path.read_text().splitlines()[0], OmegaConf.to_container(OmegaConf.load(path)) or {}


def leaves(node, prefix=()):
    """Every value a YAML body sets, by key path (a list is one value: a merge replaces it whole)."""
    for key, value in node.items():
        if isinstance(value, dict) and value:
            yield from leaves(value, (*prefix, key))
        else:
            yield (*prefix, key), value


def lookup(node, path):
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return "<absent>"
        node = node[key]
    return node


def parents(name):
    return [
        d for d in read(EXPERIMENTS / f"{name}.yaml")[1].get("defaults") or [] if isinstance(d, str) and d != "_self_"
    ]


def dependents(name):
    """The selectable presets that include `name` (itself, presets extending it, transitively)."""

    def includes(preset):
        return preset == name or any(includes(parent) for parent in parents(preset))

    return [preset for preset in presets("train") + presets("grpo") if includes(preset)]


@pytest.fixture(scope="module")
def composer(tmp_path_factory):
    """composer(preset, {file: text}) -> the preset's resolved config (plain) on a copy of configs/ with
    those experiment files replaced; unedited compositions are cached."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    root = tmp_path_factory.mktemp("configs") / "configs"
    shutil.copytree(CONFIG_DIR, root)
    config.compose([])  # registers the schemas in Hydra's ConfigStore
    cache = {}

    def run(name, edits=None):
        if not edits and name in cache:
            return cache[name]
        experiments = root / "experiment"
        for stem, text in (edits or {}).items():
            (experiments / f"{stem}.yaml").write_text(text)
        try:
            GlobalHydra.instance().clear()
            with initialize_config_dir(config_dir=str(root), version_base="1.3"):
                cfg = compose(config_name=PRIMARY[preset_kind(name)], overrides=[f"experiment={name}"])
            plain = OmegaConf.to_container(cfg, resolve=True)
        finally:
            for stem in edits or {}:
                shutil.copy(EXPERIMENTS / f"{stem}.yaml", experiments / f"{stem}.yaml")
        if not edits:
            cache[name] = plain
        return plain

    return run


def edited(name, body=True, drop=None):
    """The text of experiment/<name>.yaml without its body (body=False) or without one defaults entry."""
    header, node = read(EXPERIMENTS / f"{name}.yaml")
    defaults = [d for d in node.get("defaults") or [] if d != drop]
    rest = {k: v for k, v in node.items() if k != "defaults"} if body else {}
    return f"{header}\n" + OmegaConf.to_yaml({"defaults": defaults, **rest} if defaults else rest)


@pytest.mark.parametrize("name", FILES)
def test_no_preset_or_base_restates_what_it_already_gets(name, composer):
    """Each value a file sets, and each group it overrides, must change the resolved config of at least
    one preset that includes it; otherwise the line only restates its defaults (or its base)."""
    _, node = read(EXPERIMENTS / f"{name}.yaml")
    users = dependents(name)
    assert users, f"{name} is included by no preset"
    full = {user: composer(user) for user in users}
    bare = {user: composer(user, {name: edited(name, body=False)}) for user in users}
    restated = [
        ".".join(path)
        for path, _ in leaves({k: v for k, v in node.items() if k != "defaults"})
        if all(lookup(full[user], path) == lookup(bare[user], path) for user in users)
    ]
    for entry in node.get("defaults") or []:
        if isinstance(entry, dict) and all(
            composer(user, {name: edited(name, drop=entry)}) == full[user] for user in users
        ):
            restated += [f"{key}: {value}" for key, value in entry.items()]
    assert not restated, f"{name}.yaml restates what it already gets: {restated}"


# The key whose value names a typed group's option (solver/heun.yaml is method: heun, whatever the default).
GROUP_SCHEMAS = {"solver": (SolverConfig, "method"), "flow": (FlowConfig, None)}


@pytest.mark.parametrize(
    "path",
    sorted(p for group in GROUP_SCHEMAS for p in (CONFIG_DIR / group).glob("*.yaml")),
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_group_options_hold_only_what_differs_from_the_schema(path):
    schema, identity = GROUP_SCHEMAS[path.parent.name]
    defaults = dataclasses.asdict(schema())
    _, node = read(path)
    restated = [".".join(key) for key, value in leaves(node) if key[0] != identity and lookup(defaults, key) == value]
    assert not restated, f"{path.parent.name}/{path.name} restates {schema.__name__} defaults: {restated}"
