"""docs/cli.md is generated from the parser: it must match what the generator prints now."""
from pathlib import Path

from app.cli.docs import render

DOC = Path(__file__).resolve().parent.parent / "docs" / "cli.md"


def test_docs_cli_md_is_up_to_date():
    assert DOC.read_text(encoding="utf-8") == render(), "run: python -m app.cli.docs > docs/cli.md"


def test_every_command_and_flag_is_documented():
    from app.cli import COMMANDS

    text = render()
    for name in COMMANDS:
        assert f"## `diffmine {name}`" in text
    for flag in ("--label-column", "--backend {pixel,stable-diffusion}", "--all-labels", "--queue",
                 "--wait", "--format {json,csv,html}", "--patch-size", "--json", "--home"):
        assert flag in text
