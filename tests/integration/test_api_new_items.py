"""An item first seen in the stream is recommendable before any model version knows it.

The feature worker pushes an ``item_stats`` row for every item with events, online and to the
offline push log; the API's trending list (its answer whenever the model cannot give one) lists
the catalog from the item file *and* that log, so a new item ranks by its stats at the next
trending refresh (bound: the worker's push interval + ``api.item_refresh_interval_s``;
docs/design/serving.md#new-items). The model ranks it from the next trainer version on
(tests/e2e/test_demo.py checks that on the loop).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pandas as pd
import pytest

from features import store as feature_store
from serving.api.server import ApiServer
from serving.api.settings import ApiSettings
from streamrec.kafka.admin import ensure_topics
from streamrec.ops.settings import StackSettings
from streamrec.ops.stack.ports import free_ports
from tests.integration.test_api_server import CATALOG, make_settings, pb, set_up_features

NEW_ITEM = "first-seen-in-stream"
REFRESH_S = 0.5


@pytest.fixture
def settings(local_stack: object, stack_settings: StackSettings, tmp_path: Path) -> ApiSettings:
    (closed_port,) = free_ports(1)  # no model server: every answer is the trending list
    built = make_settings(
        stack_settings,
        tmp_path,
        f"new{uuid.uuid4().hex[:8]}",
        f"127.0.0.1:{closed_port}",
        item_refresh_interval_s=REFRESH_S,
    )
    ensure_topics(built)
    set_up_features(built)
    return built


@pytest.fixture
def stub(settings: ApiSettings) -> Iterator[object]:
    server = ApiServer(settings)
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield pb.grpc.RecommenderStub(channel)
    server.stop(1)


def shown(stub: object) -> list[str]:
    response = stub.Recommend(pb.pb2.RecommendRequest(user_id="1", k=5), timeout=10)  # type: ignore[attr-defined]
    assert response.fallback and response.fallback_reason == "model_unavailable"
    return [item.item_id for item in response.items]


def test_an_item_first_seen_in_the_stream_is_recommended_through_trending(settings: ApiSettings, stub: object) -> None:
    assert NEW_ITEM not in CATALOG and NEW_ITEM not in shown(stub)
    now = pd.Timestamp.now(tz="UTC")
    store = feature_store.open_store(settings)
    # What the worker pushes after the new item's events: online row and offline log together.
    feature_store.push_item_stats(
        store,
        pd.DataFrame(
            {
                "item_id": [NEW_ITEM],
                "count_1h": [500],
                "count_24h": [500],
                "trending_score": [500.0],
                "event_timestamp": [now],
            }
        ),
    )
    pushed = time.monotonic()
    deadline = pushed + 20 * REFRESH_S + 10  # generous for a busy 2-core host
    while NEW_ITEM not in (items := shown(stub)):
        assert time.monotonic() < deadline, (
            f"{NEW_ITEM} not recommended {time.monotonic() - pushed:.1f}s after its push"
        )
        time.sleep(REFRESH_S / 5)
    assert items[0] == NEW_ITEM  # the highest trending score of the catalog
