"""Session fixtures: a real Kafka broker and Redis on free ports, started through the same
``LocalStack`` (supervisord) that ``streamrec stack up`` uses, and stopped at the end."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from streamrec.core.settings import CommonSettings, TopicSettings
from streamrec.ops.settings import StackSettings
from streamrec.ops.stack.ports import stack_settings_on_free_ports


@pytest.fixture(scope="session")
def stack_settings(tmp_path_factory: pytest.TempPathFactory) -> StackSettings:
    return stack_settings_on_free_ports(Path(tmp_path_factory.mktemp("stack")))


@pytest.fixture(scope="session")
def local_stack(stack_settings: StackSettings) -> Iterator[object]:
    from streamrec.ops.stack.local_stack import LocalStack

    stack = LocalStack(stack_settings)
    stack.up()
    try:
        yield stack
    finally:
        stack.down()


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A second stack of three Kafka nodes (and its Redis), for the cluster and fault tests; a
    killed node stays down until the test starts it again (``stack.restart_crashed`` off)."""
    from tests.support.cluster import running_cluster

    with running_cluster(Path(tmp_path_factory.mktemp("cluster")), brokers=3, restart_crashed=False) as stack:
        yield stack


@pytest.fixture
def fresh_settings(local_stack: object, stack_settings: StackSettings) -> CommonSettings:
    """Settings on the running stack with topics of their own, so tests never see each
    other's records."""
    from streamrec.kafka.admin import ensure_topics

    topics = TopicSettings.prefixed(f"t{uuid.uuid4().hex[:8]}")
    settings = CommonSettings(
        kafka=stack_settings.kafka, redis=stack_settings.redis, paths=stack_settings.paths, topics=topics
    )
    ensure_topics(settings)
    return settings


LEVELS = ("unit", "integration", "faults", "e2e")


@pytest.hookimpl(tryfirst=True)  # before xdist reads the xdist_group marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark tests by folder (tests/unit, tests/integration, tests/faults, tests/e2e) so ``-m``
    selects them, and split them into two ``xdist_group`` lanes for ``make test`` (``-n 2 --dist
    loadgroup``), each run in order on one worker: ``unit`` (no services, CPU) and ``services``
    (everything that starts real services: integration, then faults, then the whole-loop tests,
    one at a time, so the processes they kill and time share the machine with unit tests only).
    Splits that ran service tests on both workers made timing tests flaky (docs/known-gaps.md).
    """
    order: dict[str, int] = {}
    for item in items:
        level = next((name for name in LEVELS if f"tests/{name}/" in str(item.path).replace("\\", "/")), None)
        if level is None:
            continue
        item.add_marker(getattr(pytest.mark, level))
        item.add_marker(pytest.mark.xdist_group("unit" if level == "unit" else "services"))
        order[item.nodeid] = LEVELS.index(level)
    items.sort(key=lambda item: order.get(item.nodeid, len(LEVELS)))
