"""Importing ``streams`` does no work; reading an app module's ``app`` builds that app.

Run in a fresh interpreter, so modules imported by earlier tests cannot hide import-time work.
The child counts the settings objects and Faust apps created and lists the state directory,
once after importing every module of ``streams`` and once after reading each app.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from streamrec.core.settings import ENV_PREFIX, PROJECT_ROOT

CHILD = r"""
import importlib, json, os, pkgutil, sys

import faust.app.base
from streamrec.core import settings as core_settings

created = {"settings": [], "apps": []}
settings_init = core_settings.CommonSettings.__init__
app_init = faust.app.base.App.__init__


def counting_settings_init(self, *args, **kwargs):
    created["settings"].append(type(self).__name__)
    settings_init(self, *args, **kwargs)


def counting_app_init(self, *args, **kwargs):
    created["apps"].append(args[0] if args else kwargs.get("id"))
    app_init(self, *args, **kwargs)


core_settings.CommonSettings.__init__ = counting_settings_init
faust.app.base.App.__init__ = counting_app_init

import streams

modules = sorted(f"streams.{info.name}" for info in pkgutil.iter_modules(streams.__path__))
for name in modules:
    importlib.import_module(name)
state_dir = os.environ["STREAMREC_PATHS__STATE_DIR"]
report = {
    "modules": modules,
    "at_import": {key: list(value) for key, value in created.items()},
    "state_dir_at_import": sorted(os.listdir(state_dir)),
}
print(json.dumps(report), flush=True)

for name in ("streams.app", "streams.joiner_app"):
    getattr(sys.modules[name], "app")  # what `faust -A <name> worker` reads
print(json.dumps({"after_app": created}))
"""


def test_importing_streams_builds_nothing_until_an_app_is_read(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    env = {key: value for key, value in os.environ.items() if not key.upper().startswith(ENV_PREFIX)}
    env[f"{ENV_PREFIX}PATHS__STATE_DIR"] = str(state_dir)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    child = subprocess.Popen(  # noqa: S603 -- this interpreter, a fixed script
        [sys.executable, "-c", CHILD], cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err.decode()[-3000:]
    at_import, after_app = (json.loads(line) for line in out.decode().splitlines()[-2:])

    assert {"streams.app", "streams.joiner_app", "streams.faust_app", "streams.cli"} <= set(at_import["modules"])
    assert at_import["at_import"] == {"settings": [], "apps": []}
    assert at_import["state_dir_at_import"] == []
    # Reading ``app`` builds each app once, from loaded settings, with its state directory.
    assert after_app["after_app"]["apps"] == ["streamrec-features", "streamrec-joiner"]
    assert {"StreamsSettings", "JoinerSettings"} <= set(after_app["after_app"]["settings"])
    assert sorted(path.name for path in state_dir.iterdir()) == ["joiner", "streams"]
