"""The registry rules the registry-wide tests share (timm style: every entry of a config group is
tested unless a named exclusion with a reason says otherwise).

An entry of ``conf/attack/`` or ``conf/defense/`` is either a method (its class's ``name`` is the
file's name and lives in ``<package>/<name>.py``) or a config-only variant: another entry's
class with other settings, written as a Hydra extension of that entry (``defaults: [<base>,
_self_]`` plus the changed keys) or with ``_target_`` pointing at the shared class. A variant
is tested like any other entry; its class's ``name`` is its base entry's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

CONF = Path(__file__).resolve().parents[1] / "conf"


def options(group: str, conf: Path = CONF) -> list[str]:
    return sorted(p.stem for p in (conf / group).glob("*.yaml"))


def load_entry(group: str, name: str, conf: Path = CONF) -> DictConfig:
    """An entry's config as Hydra composes a group option: its defaults list (entries of the same
    group) merged in order, ``_self_`` last unless placed; interpolations left unresolved."""
    cfg = OmegaConf.load(conf / group / f"{name}.yaml")
    defaults = list(cfg.pop("defaults", None) or [])
    if "_self_" not in defaults:
        defaults.append("_self_")
    merged = OmegaConf.create()
    for entry in defaults:
        part = cfg if entry == "_self_" else load_entry(group, str(entry), conf)
        merged = OmegaConf.merge(merged, part)
    return merged  # type: ignore[return-value]


def base_entry(group: str, name: str, conf: Path = CONF) -> str:
    """The entry a config-only variant extends (the first entry of its defaults list); a method's
    own name."""
    cfg = OmegaConf.load(conf / group / f"{name}.yaml")
    for entry in cfg.get("defaults", None) or []:
        if entry != "_self_":
            return base_entry(group, str(entry), conf)
    return name


def assert_registered(obj: Any, name: str, package: str, names: list[str]) -> None:
    """``obj``, built from entry ``name``, is a method of that name in ``<package>.<name>``, or a
    config-only variant: the class of another registered entry."""
    assert obj.name == name or (obj.name in names and obj.name != name), (
        f"{package} entry {name!r} builds {type(obj).__name__} named {obj.name!r}, which is "
        f"neither {name!r} nor another entry of the group (a variant's base): {names}"
    )
    assert type(obj).__module__ == f"{package}.{obj.name.lower()}", (name, type(obj).__module__)
