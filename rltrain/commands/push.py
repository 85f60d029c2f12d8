"""``rltrain push push.folder=DIR push.repo_id=owner/name`` (or ``local:PATH``): upload an exported folder
(rltrain/export.py)."""

from __future__ import annotations

from pathlib import Path

from rltrain.commands.setup import command_config, exit_config_error
from rltrain.export import ExportError, push


def main(args: list[str]) -> None:
    p = command_config(args).push
    try:
        if not p.repo_id or not p.folder:
            raise ExportError("push.folder and push.repo_id must be set (repo_id local:PATH for a directory)")
        print(f"pushed {p.folder} to {push(Path(p.folder), p.repo_id, private=p.private, endpoint=p.endpoint)}")
    except ExportError as err:
        exit_config_error(str(err))
