"""Rewrite pyproject's [tool.flwr.app.config] from RunConfig's defaults (run after changing them).

tests/test_config.py checks that the block equals ``RunConfig().to_flat()``.
"""

from __future__ import annotations

import re
from pathlib import Path

from copra_core.config import RunConfig, toml_value
from copra_core.reporting import atomic_write_text

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def main() -> None:
    text = PYPROJECT.read_text()
    body = "".join(f"{key} = {toml_value(value)}\n" for key, value in RunConfig().to_flat().items())
    new, count = re.subn(r"(\[tool\.flwr\.app\.config\]\n)(?:[^\[\n][^\n]*\n)*", lambda m: m.group(1) + body, text)
    if count != 1:
        raise SystemExit("pyproject.toml: [tool.flwr.app.config] section not found exactly once")
    atomic_write_text(PYPROJECT, new)  # never half a pyproject.toml


if __name__ == "__main__":
    main()
