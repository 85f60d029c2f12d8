"""Each config default lives in one place: the dataclass schema (rltrain/config.py) or the YAML in conf/, never both.

A YAML value that equals what its file would get without it (the schema default, or what the file inherits) is a
restatement; a schema default that the YAML always overrides never takes effect. Both fail here. Compose-only: no
model is loaded.

- conf/<group>/*.yaml fills Config.<group>; a file whose `defaults` list names another file of its group (rollout/vllm:
  `[hf, _self_]`) is compared against what it inherits from that file.
- conf/config.yaml and conf/experiment/*.yaml are global: each is compared against the composed config without its
  own body (the schema, the chosen group options, conf/config.yaml and any experiment it inherits).
"""

from __future__ import annotations

import dataclasses
import enum
import shutil
import typing
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, ListConfig, OmegaConf

from rltrain.config import Config, register
from rltrain.paths import CONF_DIR

# Config groups (and the same keys in global files) not checked yet. algorithm: the algorithm configs move into their
# modules in the same redesign (AlgorithmConfig, GuideConfig, RLPlusConfig, conf/algorithm/); drop it here then.
DEFERRED: set[str] = set()

# Keys conf/config.yaml may set differently from the schema on purpose: a choice of the default experiment that is no
# general default. conf/config.yaml is composed into every run, so any other value it sets is a schema default that
# never takes effect and belongs in the schema.
DEFAULT_EXPERIMENT_CHOICES: set[str] = set()

NODES = typing.get_type_hints(Config)
GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name in NODES and p.name not in DEFERRED)
GROUP_FILES = [(g, p.stem) for g in GROUPS for p in sorted((CONF_DIR / g).glob("*.yaml"))]
GLOBAL_FILES = ["config.yaml"] + sorted(f"experiment/{p.name}" for p in (CONF_DIR / "experiment").glob("*.yaml"))
_ABSENT = object()


def _read(path: Path) -> tuple[list, dict]:
    """A YAML file's `defaults` list and its body (without the hydra: section)."""
    raw = OmegaConf.to_container(OmegaConf.load(path)) or {}
    defaults = raw.pop("defaults", [])
    raw.pop("hydra", None)
    return defaults, raw


def _leaves(body: dict, prefix: str = "") -> list[str]:
    """Dotted paths of the values a body sets; a list or an empty dict is one value."""
    paths = []
    for key, value in body.items():
        if isinstance(value, dict) and value:
            paths += _leaves(value, f"{prefix}{key}.")
        else:
            paths.append(f"{prefix}{key}")
    return paths


def _value(cfg: DictConfig, path: str):
    value = OmegaConf.select(cfg, path, default=_ABSENT)
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True, enum_to_str=True)
    return value.name if isinstance(value, enum.Enum) else value


def _same_as_base(base: DictConfig, body: dict) -> list[str]:
    """The paths where body sets exactly what base already holds."""
    base = base.copy()
    OmegaConf.set_struct(base, False)
    merged = OmegaConf.merge(base, body)
    return [p for p in _leaves(body) if _value(base, p) is not _ABSENT and _value(merged, p) == _value(base, p)]


def _schema(group: str) -> DictConfig:
    return OmegaConf.structured(NODES[group])


def _group_parents(group: str, option: str) -> list[str]:
    defaults, _ = _read(CONF_DIR / group / f"{option}.yaml")
    parents = [d for d in defaults if d != "_self_"]
    assert all(isinstance(p, str) and not set(p) & set("/@:") for p in parents), (
        f"conf/{group}/{option}.yaml: only same-group parents are understood here: {defaults}")
    assert not parents or defaults[-1] == "_self_", f"conf/{group}/{option}.yaml: put _self_ last"
    return parents


def _group_yaml(group: str, option: str) -> DictConfig:
    """What a group option sets, its same-group parents included."""
    _, body = _read(CONF_DIR / group / f"{option}.yaml")
    return OmegaConf.merge(*[_group_yaml(group, p) for p in _group_parents(group, option)], body)


def _effective(group: str, option: str) -> DictConfig:
    return OmegaConf.merge(_schema(group), _group_yaml(group, option))


@pytest.mark.parametrize("group,option", GROUP_FILES)
def test_group_option_restates_nothing(group, option):
    base = OmegaConf.merge(_schema(group), *[_group_yaml(group, p) for p in _group_parents(group, option)])
    _, body = _read(CONF_DIR / group / f"{option}.yaml")
    restated = _same_as_base(base, body)
    assert not restated, (f"conf/{group}/{option}.yaml restates the schema default (or its parent's value) of "
                          f"{', '.join(f'{group}.{p}' for p in restated)}: delete the line")


@pytest.fixture(scope="module")
def bodiless(tmp_path_factory):
    """The composed config as it would be without one global file's body (its defaults list kept)."""
    register()

    def compose_without(rel: str) -> DictConfig:
        copy = tmp_path_factory.mktemp("conf") / "conf"
        shutil.copytree(CONF_DIR, copy)
        text = (CONF_DIR / rel).read_text()
        defaults, _ = _read(CONF_DIR / rel)
        header = "# @package _global_\n" if text.startswith("# @package _global_") else ""
        (copy / rel).write_text(header + (OmegaConf.to_yaml({"defaults": defaults}) if defaults else ""))
        overrides = [] if rel == "config.yaml" else [f"experiment={Path(rel).stem}"]
        with initialize_config_dir(config_dir=str(copy), version_base=None):
            return compose(config_name="config", overrides=overrides)

    return compose_without


@pytest.mark.parametrize("rel", GLOBAL_FILES)
def test_global_file_restates_nothing(rel, bodiless):
    _, body = _read(CONF_DIR / rel)
    body = {k: v for k, v in body.items() if k not in DEFERRED}
    restated = _same_as_base(bodiless(rel), body)
    assert not restated, (f"conf/{rel} restates what it would get anyway (the schema, its group options, "
                          f"conf/config.yaml or the experiment it inherits): {', '.join(restated)}: delete the line")


def test_default_experiment_leaves_defaults_to_the_schema():
    _, body = _read(CONF_DIR / "config.yaml")
    schema = OmegaConf.structured(Config)
    merged = OmegaConf.merge(schema, body)
    never = [p for p in _leaves({k: v for k, v in body.items() if k not in DEFERRED})
             if p not in DEFAULT_EXPERIMENT_CHOICES and _value(merged, p) != _value(schema, p)]
    assert not never, (f"conf/config.yaml is in every run, so the schema defaults of {', '.join(never)} never take "
                       "effect: make its value the schema default (or list the key in DEFAULT_EXPERIMENT_CHOICES)")


def _owner(schema: DictConfig, path: str) -> str:
    """The path of the innermost dataclass node holding a field (dataset.columns.prompt -> dataset; '' for the
    group's own fields)."""
    parts = path.split(".")[:-1]
    while parts and not dataclasses.is_dataclass(OmegaConf.get_type(OmegaConf.select(schema, ".".join(parts)))):
        parts.pop()
    return ".".join(parts)


@pytest.mark.parametrize("group", GROUPS)
def test_every_schema_default_takes_effect_somewhere(group):
    """A schema default that every option of its group overrides differently is dead: the schema should hold the
    value. For a field of a nested node (model.tiny.*, task.dataset.*), the options that configure that node are the
    ones that count (model=tiny, the dataset tasks)."""
    schema = _schema(group)
    options = {p.stem: _group_yaml(group, p.stem) for p in sorted((CONF_DIR / group).glob("*.yaml"))}
    leaves = {o: _leaves(OmegaConf.to_container(y)) for o, y in options.items()}
    never = []
    for path in sorted({p for ps in leaves.values() for p in ps}):
        if _value(schema, path) in (_ABSENT, "", None):
            continue  # a key of a dict field (task.builtin.mix.*), or a setting with no default (task.dataset.path)
        node = _owner(schema, path)
        relevant = [o for o in options if not node or any(p.startswith(node + ".") for p in leaves[o])]
        if all(_value(_effective(group, o), path) != _value(schema, path) for o in relevant):
            never.append(f"{group}.{path} (schema {_value(schema, path)!r}; "
                         + ", ".join(f"{o}: {_value(_effective(group, o), path)!r}" for o in relevant) + ")")
    assert not never, "schema defaults that no option of the group leaves in effect: " + "; ".join(never)
