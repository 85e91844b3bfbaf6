"""README.md stays true: CI runs its test command, the config table lists every setting, and
the example config loads."""

from __future__ import annotations

import re
from pathlib import Path

from fvlm_pacs.config import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _block_after(heading: str) -> str:
    section = README.split(f"## {heading}", 1)[1]
    return re.search(r"```sh\n(.*?)\n```", section, re.S).group(1)  # type: ignore[union-attr]


def test_ci_runs_the_readme_test_command() -> None:
    command = _block_after("Run the tests").strip()
    ci = (ROOT / ".ci" / "run").read_text()
    assert f"readme_test_command='{command}'" in ci


def test_quick_start_runs_the_demo_and_documents_serve() -> None:
    """The first command a newcomer copies is the demo; ``serve`` stays the production command."""
    first = _block_after("Quick start").strip()
    assert first.startswith("python3 -m venv .venv && ") and first.endswith("fvlm-pacs demo")
    quick_start = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert "fvlm-pacs serve" in quick_start


def test_configuration_table_lists_every_setting() -> None:
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", README, re.M))
    assert set(Settings.model_fields) <= documented


def test_example_config_loads() -> None:
    s = load_settings(ROOT / "deploy" / "fvlm-pacs.example.yaml")
    assert s.destinations[0].name == "pacs"
