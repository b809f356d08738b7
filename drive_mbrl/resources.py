"""Where the project's data folders (`scenarios/`, `configs/`) are, in a source checkout and in an installed wheel.

In a checkout (and an editable install) they sit beside the package; a wheel carries copies inside the package as
`_scenarios/` and `_configs/` (see pyproject.toml). Nothing else in the package hard-codes these paths.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def data_dir(name: str) -> Path:
    """Absolute path of the project folder `name` ('scenarios' or 'configs')."""
    for candidate in (_PACKAGE / f"_{name}", _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"drive_mbrl's '{name}' folder is missing: reinstall the package (pip install .)")
