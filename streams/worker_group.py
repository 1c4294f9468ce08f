"""``--workers N``: N processes of one Faust app on this host, under supervisord in the foreground.

Partitions are Kafka's unit of parallelism: every process of an app joins the app's consumer
group and the group coordinator splits the partitions across them (and the tables with them, as
each table is partitioned like the topic its agent reads). N processes on one host and one
process on each of N hosts are the same group; ``--workers`` only saves starting them by hand.

Why supervisord: the well-kept process runner the local stack already uses. It starts the N
children (``numprocs``), restarts one that dies unexpectedly (the others keep their partitions
until the group hands the dead one's on), passes SIGTERM on to all of them and waits for their
clean shutdown (Faust commits what it has acked). Each child gets its number in
``STREAMREC_<SECTION>__WORKER_INDEX``, which moves its metrics and web ports and names its state
folder (``streams.settings.FaustAppTuning.worker_index``), so children on one host never collide.
"""

from __future__ import annotations

import configparser
import os
import shlex
import sys
import tempfile
from pathlib import Path

from streamrec.core.settings import ENV_NESTED_DELIMITER, ENV_PREFIX


def group_config(name: str, command: list[str], section: str, count: int, work_dir: Path) -> str:
    """supervisord's configuration for ``count`` copies of ``command``, logging to this terminal."""
    config = configparser.RawConfigParser()
    config["supervisord"] = {
        "nodaemon": "true",
        "logfile": str(work_dir / "supervisord.log"),
        "pidfile": str(work_dir / "supervisord.pid"),
        "directory": os.getcwd(),
        "silent": "false",
    }
    index_variable = f"{ENV_PREFIX}{section.upper()}{ENV_NESTED_DELIMITER}WORKER_INDEX"
    config[f"program:{name}"] = {
        "command": shlex.join(command).replace("%", "%%"),
        "process_name": "%(program_name)s-%(process_num)d",
        "numprocs": str(count),
        "autostart": "true",
        "autorestart": "unexpected",
        "exitcodes": "0",
        "startsecs": "5",
        "stopsignal": "TERM",
        "stopwaitsecs": "60",
        "stopasgroup": "true",
        "killasgroup": "true",
        "redirect_stderr": "true",
        "stdout_logfile": "/dev/stdout",
        "stdout_logfile_maxbytes": "0",
        "environment": f'{index_variable}="%(process_num)d"',
    }
    with (work_dir / "group.conf").open("w") as handle:
        config.write(handle)
    return str(work_dir / "group.conf")


def run_group(name: str, command: list[str], section: str, count: int) -> None:
    """Replace this process with supervisord running ``count`` copies of ``command`` (never returns).

    ``section`` is the settings section whose ``worker_index`` numbers the copies (``streams``,
    ``joiner``). Every ``STREAMREC_*`` variable of this process reaches each copy unchanged.
    """
    if count < 1:
        raise ValueError(f"--workers must be at least 1, not {count}")
    work_dir = Path(tempfile.mkdtemp(prefix=f"streamrec-{name}-group-"))
    config_path = group_config(name, command, section, count, work_dir)
    supervisord = [sys.executable, "-m", "supervisor.supervisord", "-c", config_path]
    os.execv(sys.executable, supervisord)  # noqa: S606 -- our own interpreter, no shell


def streamrec_command(*arguments: str) -> list[str]:
    """``streamrec <arguments>`` with the console script of this interpreter's environment."""
    return [str(Path(sys.executable).with_name("streamrec")), *arguments]
