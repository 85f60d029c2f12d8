"""Where the Hydra configs live: conf/ at the repository root, or rltrain/conf/ inside an installed wheel."""

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
CONF_DIR = _PACKAGE / "conf" if (_PACKAGE / "conf").is_dir() else _PACKAGE.parent / "conf"
