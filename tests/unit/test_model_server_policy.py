"""The availability-preserving version policy of ``ModelManager``, with loads done in memory.

The real loader (``LoadedVersion``) is replaced by a fake whose ``load`` fails for chosen
versions, and the executors run tasks inline, so each assertion sees the state right after a
poll. The integration tests cover the same rules with real SavedModels over gRPC.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor, Future
from pathlib import Path
from typing import Any

import pytest

from serving.model_server import manager as manager_module
from serving.model_server.manager import ModelManager, State
from serving.model_server.versions import LoadError
from serving.protocol.errors import InvalidArgument, NotFound
from serving.protocol.models_config import parse_config

BROKEN: set[int] = set()


class FakeLoadedVersion:
    def __init__(self, model_name: str, version: int, path: Path, batching: object = None) -> None:
        self.model_name, self.version, self.path = model_name, version, path
        self.in_flight = 0

    def load(self) -> None:
        if self.version in BROKEN:
            raise LoadError(f"version {self.version} is broken")

    def acquire(self) -> None:
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1

    def wait_idle(self, timeout_s: float | None = None) -> bool:
        return self.in_flight == 0

    def unload(self) -> None:
        assert self.in_flight == 0, "unloaded while requests were still running on it"


class DeferredExecutor(Executor):
    """Holds tasks until ``run_all``: lets a test look at the state between two steps."""

    def __init__(self) -> None:
        self.tasks: list[Callable[[], Any]] = []

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        self.tasks.append(lambda: fn(*args, **kwargs))
        return Future()

    def run_all(self) -> None:
        while self.tasks:
            self.tasks.pop(0)()


class InlineExecutor(Executor):
    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        future.set_result(fn(*args, **kwargs))
        return future


@pytest.fixture
def model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModelManager:
    monkeypatch.setattr(manager_module, "LoadedVersion", FakeLoadedVersion)
    BROKEN.clear()
    config = parse_config(f"model_config_list {{ config {{ name: 'm' base_path: '{tmp_path}' }} }}")
    inline = InlineExecutor()
    return ModelManager(
        config.model_config_list.config[0], load_executor=inline, unload_executor=inline, max_num_load_retries=0
    )


def states(model: ModelManager) -> dict[int, State]:
    return {record.version: record.state for record in model.statuses()}


def test_new_version_loads_before_the_old_one_unloads(model: ModelManager) -> None:
    (model.base_path / "1").mkdir()
    model.refresh()
    assert states(model) == {1: State.AVAILABLE}
    (model.base_path / "2").mkdir()
    model.refresh()
    assert states(model) == {2: State.AVAILABLE, 1: State.END}
    served = model.acquire()
    assert served.version == 2
    served.release()


def test_broken_new_version_keeps_the_old_one_serving(model: ModelManager) -> None:
    (model.base_path / "1").mkdir()
    model.refresh()
    BROKEN.add(2)
    (model.base_path / "2").mkdir()
    model.refresh()
    model.refresh()  # polling again does not retry the failed version forever
    assert states(model) == {2: State.END, 1: State.AVAILABLE}
    assert "broken" in model.statuses(2)[0].error_message
    served = model.acquire()
    assert served.version == 1
    served.release()
    with pytest.raises(NotFound, match=r"Specific\(m, 2\)"):
        model.acquire(version=2)
    BROKEN.clear()
    (model.base_path / "3").mkdir()  # the next good version replaces both
    model.refresh()
    assert states(model) == {3: State.AVAILABLE, 2: State.END, 1: State.END}


def test_a_version_in_use_is_unloaded_only_after_its_requests_finish(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(manager_module, "LoadedVersion", FakeLoadedVersion)
    config = parse_config(f"model_config_list {{ config {{ name: 'm' base_path: '{tmp_path}' }} }}")
    unloads = DeferredExecutor()
    model = ModelManager(config.model_config_list.config[0], load_executor=InlineExecutor(), unload_executor=unloads)
    (tmp_path / "1").mkdir()
    model.refresh()
    model.set_labels({"stable": 1})
    in_use = model.acquire(version=1)  # a request is running on version 1
    (tmp_path / "2").mkdir()
    model.refresh()
    assert states(model) == {2: State.AVAILABLE, 1: State.UNLOADING}
    with pytest.raises(NotFound):
        model.acquire(label="stable")  # no new request reaches a version that is going away
    assert model.acquire().version == 2
    in_use.release()  # the running request finishes; only then may the unload complete
    unloads.run_all()
    assert states(model) == {2: State.AVAILABLE, 1: State.END}


def test_labels_resolve_and_unknown_labels_are_invalid(model: ModelManager) -> None:
    (model.base_path / "4").mkdir()
    model.refresh()
    model.set_labels({"stable": 4})
    assert model.acquire(label="stable").version == 4
    with pytest.raises(InvalidArgument, match="Unrecognized servable version label: canary"):
        model.acquire(label="canary")


def test_retire_unloads_everything(model: ModelManager) -> None:
    (model.base_path / "1").mkdir()
    model.refresh()
    model.retire()
    assert states(model) == {1: State.END}
    with pytest.raises(NotFound, match=r"Latest\(m\)"):
        model.acquire()
