"""Keys and a secured config for the security tests (real keys, real processes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fesloop.security import generate_keys

SECURITY_SECTION = """
[security]
keys_dir = "{keys}"
clients = [
  {{ key = "operator", control = ["status", "arm", "disarm", "stop", "reset", "shutdown"] }},
  {{ key = "monitor", control = ["status", "stop"] }},
]
"""


@pytest.fixture
def keys_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "keys"
    generate_keys(directory)
    return directory


@pytest.fixture
def secured_config(write_config, keys_dir: Path):
    """A configs/ file with fresh ports and a [security] section using ``keys_dir``."""

    def write(base: str = "demo.toml", replace: dict[str, str] | None = None) -> Path:
        path = write_config(base, replace)
        path.write_text(path.read_text() + SECURITY_SECTION.format(keys=keys_dir))
        return path

    return write
