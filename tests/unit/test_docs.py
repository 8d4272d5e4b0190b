"""README, OpenAPI and --help stay true to the code."""

from __future__ import annotations

import re
from pathlib import Path

from click.testing import CliRunner

from app.cli import main
from app.estimators import REGISTRY
from app.main import create_app
from app.settings import Settings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_every_setting_is_documented():
    for name in Settings.model_fields:
        assert f"IA_{name.upper()}" in README, f"IA_{name.upper()} missing from README's configuration table"


def test_readme_settings_exist():
    documented = set(re.findall(r"`IA_([A-Z_]+)`", README))
    assert documented <= {n.upper() for n in Settings.model_fields}


def test_every_estimator_is_documented():
    for name in REGISTRY:
        assert f"`{name}`" in README


def test_cli_help_lists_the_commands_the_readme_names():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in ("serve", "worker", "migrate", "sweep", "demo"):
        assert command in result.output


def test_openapi_documents_every_route_readme_uses(tmp_path):
    spec = create_app(Settings(data_dir=tmp_path), run_sweeper=False).openapi()
    for path in re.findall(r"\$API(/v1/[a-z/<>_-]+)", README):
        template = re.sub(r"<[^>]+>", "{}", path.rstrip("/"))
        pattern = "^" + re.escape(template).replace(r"\{\}", r"\{[a-z_]+\}") + "$"
        assert any(re.match(pattern, p) for p in spec["paths"]), path
