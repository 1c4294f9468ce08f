"""Whether the ``streamrec`` CLI accepts a command line that a deployment file runs.

The compose file and the Helm chart run the project's image, whose entrypoint is ``streamrec``,
so a service's command is a subcommand plus flags. Checked against the real CLI, a renamed
command or flag fails a test instead of a container at start.
"""

from __future__ import annotations

from typing import Any

import typer
import typer.core

from streamrec.ops.cli import app


def resolve(words: list[str]) -> tuple[list[str], Any, list[str]]:
    """Walk the CLI's command groups: (subcommand path, the command it names, remaining args).

    Typer (0.2x) vendors its own copy of Click, so the Click objects come from typer, not click.
    """
    command = typer.main.get_command(app)
    path: list[str] = []
    while isinstance(command, typer.core.TyperGroup) and len(path) < len(words):
        subcommand = command.get_command(typer.Context(command), words[len(path)])
        assert subcommand is not None, f"`streamrec {' '.join(words)}`: no command {words[len(path)]!r}"
        command = subcommand
        path.append(words[len(path)])
    assert not isinstance(command, typer.core.TyperGroup), f"`streamrec {' '.join(words)}` names a group, not a command"
    return path, command, words[len(path) :]


def assert_cli_accepts(words: list[str], where: str) -> None:
    """``streamrec <words>`` names a command, and its arguments parse exactly as a run would parse
    them (unknown options, wrong value types), without running the command."""
    path, command, args = resolve(words)
    try:
        command.make_context(f"streamrec {' '.join(path)}", list(args))
    except Exception as exc:  # noqa: BLE001 -- Click's usage errors, reported with where they came from
        raise AssertionError(f"{where}: `streamrec {' '.join(words)}` is refused by the CLI: {exc}") from exc
