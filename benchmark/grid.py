"""The experiments' grids, derived from the config groups: no experiment lists its methods.

Two OmegaConf resolvers, registered by :func:`benchmark.callbacks.register_resolvers` before
Hydra composes anything, for ``hydra.sweeper.params`` values:

- ``${bench_options:<group>}``: every option of a config group (``attack``, ``defense``, or a
  folder of one, ``attack_setting/backdoorbench`` -> ``backdoorbench/badnets,...``),
  comma-joined, i.e. one sweep value per option.
  ``${bench_options:<group>,[a,b]}`` leaves out the named options (give the reason in a
  comment beside it).
- ``${bench_cells:<mode>}``: a list of ``cell=<attack>__<defense>`` values, for grids that are
  not a cross product (:func:`cells`): ``product`` (every attack x every defense), ``anchor``
  (every attack undefended + every defense on :data:`ANCHOR`), ``covering`` (``anchor`` plus,
  for every other attack, one defense of each defense *family*). Optional second and third
  arguments: lists of attacks and of defenses to leave out.

Options are read where Hydra's own ``glob(*)`` reads them (the config loader of the running
app, so a copy of ``conf/`` or a ConfigStore entry counts); outside a Hydra app, from this
package's ``conf/``. The order is stable: :data:`BASELINE` first (a parallel launcher's first
jobs are then one per attack, training the different backdoored models at once), then the
rest in Python's ``sorted`` order (uppercase first, as Hydra's ``glob``).

A defense's family is its class's ``stage`` (``defenses.base.Stage``: pre_training,
in_training, post_training, inference), read from the config's ``_target_``. A cell that no
file in ``conf/cell/`` defines is generated: a ConfigStore entry ``cell/<attack>__<defense>``
that overrides ``/attack`` and ``/defense`` (:func:`register_cells`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import get_class

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
BASELINE = "undefended"  # the no-defense baseline: first in every defense list
ANCHOR = "badnets"  # the attack every defense meets in the anchor and covering grids
MODES = ("product", "anchor", "covering")


def _loader() -> Any:
    """The running app's config loader (what ``glob(*)`` reads); outside an app, one over this
    package's ``conf/``."""
    gh = GlobalHydra.instance()
    return gh.config_loader() if gh.is_initialized() else package_loader()


def package_loader(conf_dir: Path | str = CONF_DIR) -> Any:
    """Hydra's own config loader over ``conf_dir`` (default: this package's ``conf/``), as the
    app builds it."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.utils import create_config_search_path

    return ConfigLoaderImpl(config_search_path=create_config_search_path(str(conf_dir)))


def ordered(names: Iterable[str]) -> list[str]:
    """:data:`BASELINE` first, then ``sorted``."""
    names = sorted(set(names))
    return [n for n in names if n == BASELINE] + [n for n in names if n != BASELINE]


def options(group: str, exclude: Sequence[str] = (), loader: Any = None) -> list[str]:
    """Every option of ``group`` minus ``exclude``, in :func:`ordered` order. An exclusion that
    is not an option is an error (a renamed method must not silently come back)."""
    found = (loader or _loader()).get_group_options(group)
    unknown = set(exclude) - set(found)
    if unknown:
        raise ValueError(f"excluded {sorted(unknown)} are not options of {group}: {found}")
    return ordered(n for n in found if n not in set(exclude))


def _target(loader: Any, group: str, name: str) -> str:
    """The ``_target_`` of a group option; a config-only variant without one takes its base's
    (the first plain entry of its defaults list)."""
    result = loader.repository.load_config(f"{group}/{name}")
    if "_target_" in result.config:
        return str(result.config._target_)
    for entry in result.defaults_list or []:  # ConfigDefault(path=...) of a plain entry
        path = getattr(entry, "path", None)
        if path and path != "_self_" and not getattr(entry, "group", None):
            return _target(loader, group, path.lstrip("/").removeprefix(f"{group}/"))
    raise ValueError(f"{group}/{name} has no _target_")


def family(name: str, loader: Any = None) -> str:
    """A defense's family: its class's ``stage``."""
    return str(get_class(_target(loader or _loader(), "defense", name)).stage.value)


def families(defenses: Sequence[str], loader: Any = None) -> dict[str, list[str]]:
    """``family -> its defenses`` (in ``defenses`` order), :data:`BASELINE` left out."""
    loader = loader or _loader()
    out: dict[str, list[str]] = {}
    for d in defenses:
        if d != BASELINE:
            out.setdefault(family(d, loader), []).append(d)
    return dict(sorted(out.items()))


def cells(
    mode: str,
    exclude_attacks: Sequence[str] = (),
    exclude_defenses: Sequence[str] = (),
    loader: Any = None,
) -> list[tuple[str, str]]:
    """The ``(attack, defense)`` pairs of a grid, baseline cells first.

    - ``product``: defense-major (every attack undefended first), each defense in
      :func:`ordered` order.
    - ``anchor``: every attack undefended, then every defense on :data:`ANCHOR`.
    - ``covering``: ``anchor`` (where the anchor meets every defense), then for each other
      attack one defense of each family (:func:`families`), rotating: the i-th of those
      attacks gets each family's ``(i mod its size)``-th defense, so a family's defenses are
      spread over the attacks. Its size is A + (D - 1) + (A - 1) x F (F families), not A x D.
    """
    loader = loader or _loader()
    attacks = options("attack", exclude_attacks, loader)
    defenses = options("defense", exclude_defenses, loader)
    if mode == "product":
        return [(a, d) for d in defenses for a in attacks]
    if mode not in MODES:
        raise ValueError(f"unknown grid mode {mode!r}; one of {MODES}")
    anchor = ANCHOR if ANCHOR in attacks else attacks[0]
    out = [(a, BASELINE) for a in attacks if BASELINE in defenses]
    out += [(anchor, d) for d in defenses if d != BASELINE]
    if mode == "covering":
        fams = families(defenses, loader)
        others = [a for a in attacks if a != anchor]
        for i, attack in enumerate(others):
            for members in fams.values():
                out.append((attack, members[i % len(members)]))
    return out


def cell_name(attack: str, defense: str) -> str:
    return f"{attack}__{defense}"


def register_cells(pairs: Iterable[tuple[str, str]], loader: Any = None) -> None:
    """A ConfigStore ``cell/<attack>__<defense>`` for every pair no config defines (a file in
    ``conf/cell/`` wins: it comes earlier in the search path)."""
    loader = loader or _loader()
    existing = set(loader.get_group_options("cell"))
    store = ConfigStore.instance()
    for attack, defense in pairs:
        name = cell_name(attack, defense)
        if name in existing:
            continue
        node = {"defaults": [{"override /attack": attack}, {"override /defense": defense}]}
        store.store(group="cell", name=name, node=node, package="_global_")


def register_all_cells() -> None:
    """Every pair of this package's attacks and defenses, at import: a launcher worker then
    composes ``cell=<attack>__<defense>`` without having resolved the sweep."""
    loader = package_loader()
    register_cells(cells("product", loader=loader), loader)


def _as_list(arg: Any) -> list[str]:
    if arg is None:
        return []
    if isinstance(arg, str):
        return [arg] if arg else []
    return [str(a) for a in arg]


def options_resolver(group: str, exclude: Any = None) -> str:
    """``${bench_options:<group>[,[excluded]]}``. Options of a folder inside a group are named
    as that group's choices: ``attack_setting/backdoorbench`` -> ``backdoorbench/badnets, ...``
    (the sweep key is ``attack_setting``)."""
    prefix = f"{group.split('/', 1)[1]}/" if "/" in group else ""
    return ",".join(prefix + o for o in options(group, _as_list(exclude)))


def cells_resolver(mode: str, exclude_attacks: Any = None, exclude_defenses: Any = None) -> str:
    """``${bench_cells:<mode>[,[attacks excluded],[defenses excluded]]}``: cell names, each
    registered (:func:`register_cells`)."""
    loader = _loader()
    pairs = cells(mode, _as_list(exclude_attacks), _as_list(exclude_defenses), loader)
    register_cells(pairs, loader)
    return ",".join(cell_name(a, d) for a, d in pairs)
