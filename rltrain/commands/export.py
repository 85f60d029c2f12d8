"""``rltrain export [overrides]``: adapters (+ router.json) as a hub-ready folder (rltrain/export.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from rltrain.commands.setup import command_config, exit_config_error
from rltrain.export import ExportError, export


def main(args: list[str]) -> None:
    e = command_config(args).export
    try:
        out = export([dataclasses.asdict(a) for a in e.adapters], Path(e.output), router=e.router)
    except ExportError as err:
        exit_config_error(str(err))
    print(f"wrote {out}: {', '.join(a.name for a in e.adapters)}")
