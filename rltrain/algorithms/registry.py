"""Algorithms by name. A built-in is one line here; anything else is named by import path
(``algorithm.name=mypkg.module:MyAlgorithm``) or registered by a package as an entry point in the
``rltrain.algorithms`` group (``[project.entry-points."rltrain.algorithms"] myalgo = "mypkg.module:MyAlgorithm"``)."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from rltrain.algorithms.base import Algorithm
from rltrain.errors import ConfigError

BUILTIN = {
    "grpo": "rltrain.algorithms.grpo:GRPO",
    "guide": "rltrain.algorithms.guide:Guide",
    "rl_plus": "rltrain.algorithms.rl_plus:RLPlus",
    "gspo": "rltrain.algorithms.gspo:GSPO",
    "cispo": "rltrain.algorithms.cispo:CISPO",
    "sapo": "rltrain.algorithms.sapo:SAPO",
    "gmpo": "rltrain.algorithms.gmpo:GMPO",
    "ppo": "rltrain.algorithms.ppo:PPO",
}
ENTRY_POINT_GROUP = "rltrain.algorithms"


def algorithm_class(name: str) -> type[Algorithm]:
    """The class ``algorithm.name`` names; ConfigError (one line, the key) when there is none."""
    target = BUILTIN.get(name)
    if target is None:
        found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
        target = found[0].value if found else name
    if ":" not in target:
        known = sorted(BUILTIN) + sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
        raise ConfigError(f"algorithm.name={name!r} is not available; choose one of {', '.join(known)}, or name a "
                          "class as module.path:ClassName")
    module_name, _, attribute = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"algorithm.name={name!r}: cannot import {target} ({err})") from None
    if not (isinstance(cls, type) and issubclass(cls, Algorithm)):
        raise ConfigError(f"algorithm.name={name!r}: {target} is not a subclass of rltrain.algorithms.base.Algorithm")
    return cls
