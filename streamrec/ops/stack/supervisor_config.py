"""supervisord's config for the local stack, and starting supervisord on it.

One ``[program:NAME]`` per :class:`~streamrec.ops.stack.programs.Program`, each with its own
environment, log file, restart policy and clean-stop signal; the XML-RPC interface on a unix socket
(mode 0700) is how ``LocalStack`` reads state and logs. See docs/design/ops.md#the-local-stack.
"""

from __future__ import annotations

import configparser
import io
import shlex
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from streamrec.ops.stack.programs import Program


def render(
    programs: list[Program],
    environments: Mapping[str, Mapping[str, str]],
    *,
    root: Path,
    log_dir: Path,
    socket_path: Path,
    pid_path: Path,
    restart_crashed: bool,
) -> str:
    """The config text; ``environments`` maps each program's name to its environment."""
    config = configparser.RawConfigParser()
    config["unix_http_server"] = {"file": str(socket_path), "chmod": "0700"}
    config["supervisord"] = {
        "logfile": str(log_dir / "supervisord.log"),
        "pidfile": str(pid_path),
        "childlogdir": str(log_dir),
        "nodaemon": "false",
        "silent": "true",
        "directory": str(root),
    }
    config["rpcinterface:supervisor"] = {
        "supervisor.rpcinterface_factory": "supervisor.rpcinterface:make_main_rpcinterface"
    }
    config["supervisorctl"] = {"serverurl": f"unix://{socket_path}"}
    for program in programs:
        environment = environments[program.name]
        config[f"program:{program.name}"] = {
            "command": shlex.join(program.command).replace("%", "%%"),
            "autostart": str(program.autostart).lower(),
            "autorestart": "unexpected" if restart_crashed else "false",
            "startsecs": "2",
            "stopsignal": "TERM",
            "stopwaitsecs": str(program.stop_wait_s),
            "exitcodes": ",".join(str(code) for code in program.exit_codes),
            "stopasgroup": "true",
            "killasgroup": "true",
            "redirect_stderr": "true",
            "stdout_logfile": str(log_dir / f"{program.name}.log"),
            "stdout_logfile_maxbytes": "20MB",
            "environment": ",".join(f'{key}="{_quote(value)}"' for key, value in environment.items()),
        }
    rendered = io.StringIO()
    config.write(rendered)
    return rendered.getvalue()


def _quote(value: str) -> str:
    # supervisord expands %(ENV_X)s in its config and splits environment= on unquoted commas.
    return value.replace("%", "%%").replace('"', '\\"')


def start_supervisord(config_path: Path) -> bool:
    """Run supervisord on ``config_path`` (it daemonizes); False when it did not start."""
    result = subprocess.run(
        [sys.executable, "-m", "supervisor.supervisord", "-c", str(config_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.returncode == 0
