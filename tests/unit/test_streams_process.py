"""The worker's command line and environment (``tests.support.worker_process``), without starting it."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from streams.settings import StreamsSettings, StreamsTuning
from tests.support.worker_process import worker_command, worker_environment


def test_worker_command_selects_the_event_loop_before_the_app() -> None:
    command = worker_command(0, "info", "uvloop")
    # Faust reads -L when it is imported: it must come before -A and the subcommand.
    assert command[1:5] == ["-L", "uvloop", "-A", "streams.app"]
    assert worker_command(0, "info", "asyncio")[1:3] == ["-L", "aio"]


def test_unknown_event_loop_is_rejected_by_name() -> None:
    with pytest.raises(ValidationError, match="event_loop"):
        StreamsTuning(event_loop="trio")


def test_worker_environment_drops_prometheus_multiprocess_mode_and_stale_settings() -> None:
    settings = StreamsSettings(streams=StreamsTuning(event_loop="asyncio"))
    parent = {
        "PROMETHEUS_MULTIPROC_DIR": "/tmp/feast_metrics_x",
        "PROMETHEUS_MULTIPROCESS_DIR": "/tmp/feast_metrics_x",
        "STREAMREC_STREAMS__APP_ID": "stale",
        "HOME": "/root",
    }
    env = worker_environment(settings, parent)
    assert "PROMETHEUS_MULTIPROC_DIR" not in env
    assert "PROMETHEUS_MULTIPROCESS_DIR" not in env
    assert env["HOME"] == "/root"
    assert env["STREAMREC_STREAMS__APP_ID"] == settings.streams.app_id
    assert env["STREAMREC_STREAMS__EVENT_LOOP"] == "asyncio"
