"""Run Alembic programmatically (CLI start-up, tests) against a given URL."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

ROOT = Path(__file__).resolve().parents[2]  # the source tree: alembic.ini and migrations/ sit beside app/


def alembic_config(url: str) -> Config:
    if not (ROOT / "migrations" / "env.py").is_file():
        raise FileNotFoundError(
            f"no Alembic migrations at {ROOT / 'migrations'}: the migrations ship with the source tree, "
            "so install it editable (pip install -e .) rather than as a wheel"
        )
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "migrations"))
    config.attributes["url"] = url
    return config


def upgrade(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(url), revision)
