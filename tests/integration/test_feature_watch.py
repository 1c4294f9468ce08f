"""``ActivityWatch`` (the demo's and ``streams watch``'s live view) on a real Redis-backed store."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import pandas as pd

from features import push
from features import store as feature_store
from features.settings import FeaturesSettings, FeatureStoreTuning
from streamrec.feature_watch import ActivityWatch
from streamrec.settings import PathSettings, StackSettings


def activity(user_id: str, when: str, count_1h: int, recent: list[str]) -> pd.DataFrame:
    stamp = pd.Timestamp(when, tz="UTC")
    return pd.DataFrame(
        {
            "user_id": [user_id],
            "recent_items": [recent],
            "count_1h": [count_1h],
            "count_24h": [count_1h + 10],
            "last_event_ts": [int(stamp.timestamp())],
            "event_timestamp": [stamp],
        }
    )


def test_watch_shows_pushed_features_and_flags_only_changed_users(
    local_stack: object, stack_settings: StackSettings, tmp_path: Path
) -> None:
    settings = FeaturesSettings(
        redis=stack_settings.redis,
        paths=PathSettings(state_dir=tmp_path),
        features=FeatureStoreTuning(project=f"w{uuid.uuid4().hex[:10]}"),
    )
    store = feature_store.open_store(settings)
    feature_store.write_profiles(settings)
    feature_store.apply(store)
    watch = ActivityWatch(store, ["7", "13"])

    first = watch.read()
    assert [changed for _, changed in first] == [False, False]  # nothing to compare with yet
    assert "1h=None" in first[0][0]  # no activity row yet

    push.push_user_activity(store, activity("7", "1998-01-01T10:00:00", 3, ["50", "172"]), offline=False)
    second = watch.read()
    assert [changed for _, changed in second] == [True, False]
    shown = re.sub(r"=\s+", "=", second[0][0]).split()
    assert shown == ["7", "1h=3", "24h=13", "last=1998-01-01T10:00:00+00:00", "recent=[50,172]"]

    assert [changed for _, changed in watch.read()] == [False, False]
