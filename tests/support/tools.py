"""Outside clients the tests drive (kcat, docker-compose, grpcurl) and the benchmarks' load
generator (ghz), found in one place.

A missing client skips its test on a developer's machine but fails it under CI (``CI`` set, as
every CI runner does), so a broken setup step cannot turn a suite green by skipping. Go tools are
looked up where ``make go-tools`` puts them (``$GOBIN``, default ``~/go/bin``, then
``$(go env GOPATH)/bin``) before ``PATH``, because ``~/go/bin`` is often not on ``PATH``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

# The values of CI that mean "not CI" (some runners export CI=false for local dry runs).
NOT_CI_VALUES = frozenset({"", "0", "false", "no"})


@dataclass(frozen=True)
class OutsideTool:
    """How a client is installed: by ``go install`` (looked up in Go's bin folders) or a system package."""

    installed_by_go: bool
    install_step: str


SYSTEM_DEPS_STEP = "`make setup` (its system-deps step, infra/setup-system.sh, installs the Debian package)"
GO_TOOLS_STEP = "`make go-tools` (part of `make setup`; installs the pinned version into $GOBIN)"
OUTSIDE_TOOLS: dict[str, OutsideTool] = {
    "kcat": OutsideTool(installed_by_go=False, install_step=SYSTEM_DEPS_STEP),
    "docker-compose": OutsideTool(installed_by_go=False, install_step=SYSTEM_DEPS_STEP),
    "prometheus": OutsideTool(installed_by_go=False, install_step=SYSTEM_DEPS_STEP),
    "grpcurl": OutsideTool(installed_by_go=True, install_step=GO_TOOLS_STEP),
    "helm": OutsideTool(installed_by_go=True, install_step=GO_TOOLS_STEP),
    "kubeconform": OutsideTool(installed_by_go=True, install_step=GO_TOOLS_STEP),
    "ghz": OutsideTool(
        installed_by_go=True,
        install_step="`make bench-tools` (part of `make bench`; installs the pinned version into $GOBIN)",
    ),
}


def running_under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in NOT_CI_VALUES


def go_bin_dirs() -> list[Path]:
    """Where ``go install`` puts binaries, in the order the Makefile and Go use: ``$GOBIN``
    (default ``~/go/bin``), then ``$(go env GOPATH)/bin``."""
    dirs = [Path(os.environ.get("GOBIN") or Path.home() / "go" / "bin")]
    go = shutil.which("go")
    if go is not None:
        gopath = subprocess.run([go, "env", "GOPATH"], capture_output=True, text=True, timeout=30, check=False)
        # GOPATH may list several folders; go install uses the first.
        first_gopath = gopath.stdout.strip().split(os.pathsep)[0]
        if gopath.returncode == 0 and first_gopath:
            dirs.append(Path(first_gopath) / "bin")
    return dirs


def find_tool(name: str) -> str | None:
    """The path of client ``name``, or None when it is not installed."""
    if OUTSIDE_TOOLS[name].installed_by_go:
        for folder in go_bin_dirs():
            candidate = folder / name
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    return shutil.which(name)


def missing_tool_message(name: str) -> str:
    where = "$GOBIN, ~/go/bin, $(go env GOPATH)/bin or PATH" if OUTSIDE_TOOLS[name].installed_by_go else "PATH"
    return f"`{name}` was not found on {where}; install it with {OUTSIDE_TOOLS[name].install_step}"


def require_tool(name: str) -> str:
    """The path of client ``name``; without it the calling test fails under CI and skips elsewhere."""
    found = find_tool(name)
    if found is not None:
        return found
    if running_under_ci():
        pytest.fail(f"{missing_tool_message(name)} (CI is set, so a missing client fails instead of skipping)")
    pytest.skip(missing_tool_message(name))
