"""Setting the feature store up for one dataset after another, on a real Redis.

The ids of small logs collide with MovieLens-100K's ("1", "2", ...): whatever the previous dataset
wrote for those ids (profiles, stream rows, push-log rows) must be gone once another dataset is
set up, and a rerun of the same dataset must rewrite its profiles without touching its activity.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pandas as pd
import pytest
import redis
from typer.testing import CliRunner

from features import profiles
from features import store as feature_store
from features.cli import app
from features.history import historical_features
from features.settings import FeaturesSettings, FeatureStoreTuning
from streamrec.core import contracts
from streamrec.core.attributes import AttributeSchema, item_stats_features, read_schema, user_activity_features
from streamrec.core.settings import PROJECT_ROOT, PathSettings
from streamrec.datasets.description import load_dataset
from streamrec.ops.settings import StackSettings

EVENTS = "who,what,ts,action\n1,1,1700000000,view\n2,1,1700000060,purchase\n3,2,1700000120,view\n"
ITEMS = "sku,colour\n1,red\n2,blue\n"
USERS = "uid,gender\n2,F\n"  # user "1" has no row: it must not keep ml-100k's gender
DESCRIPTION = """
name = "tiny"
[interactions]
path = "events.csv"
user = "who"
item = "what"
timestamp = "ts"
kind = "action"
[items]
path = "items.csv"
id = "sku"
attributes = [{ name = "colour", type = "categorical" }]
[users]
path = "users.csv"
id = "uid"
attributes = [{ name = "gender", type = "categorical" }]
"""


def write_tiny(folder: Path) -> Path:
    for name, text in (("events.csv", EVENTS), ("items.csv", ITEMS), ("users.csv", USERS)):
        (folder / name).write_text(text)
    (folder / "tiny.toml").write_text(DESCRIPTION)
    return folder / "tiny.toml"


@pytest.fixture
def settings(local_stack: object, stack_settings: StackSettings, tmp_path: Path) -> FeaturesSettings:
    return FeaturesSettings(
        redis=stack_settings.redis,
        paths=PathSettings(state_dir=tmp_path / "state"),
        features=FeatureStoreTuning(project=f"t{uuid.uuid4().hex[:10]}"),
    )


def project_keys(settings: FeaturesSettings) -> int:
    """How many entity rows (Redis hashes) the Feast project holds: its keys end with its name."""
    client = redis.Redis(host=settings.redis.host, port=settings.redis.port, db=settings.redis.db)
    try:
        return sum(1 for _ in client.scan_iter(match=f"*{settings.features.project}".encode(), count=1000))
    finally:
        client.close()


def activity(user_id: str, schema: AttributeSchema, recent: list[str]) -> pd.DataFrame:
    when = pd.Timestamp("2023-11-14T22:15:00", tz="UTC")
    row: dict[str, object] = {name: 1 for name in user_activity_features(schema)}
    row.update(user_id=user_id, recent_items=recent, last_event_ts=int(when.timestamp()), event_timestamp=when)
    return pd.DataFrame([row])


def online(settings: FeaturesSettings, service: str, entity_id: str) -> dict[str, object]:
    frame = feature_store.read_online(feature_store.open_store(settings), service, [entity_id])
    return {str(name): value for name, value in frame.iloc[0].items()}


def test_a_dataset_with_colliding_ids_keeps_nothing_of_the_previous_one(
    settings: FeaturesSettings, tmp_path: Path
) -> None:
    store = feature_store.open_store(settings)
    feature_store.setup(settings, "ml-100k")
    ml100k = read_schema(settings.data_dir)
    feature_store.push_user_activity(store, activity("1", ml100k, ["50", "172"]))  # online and offline
    assert online(settings, contracts.USER_FEATURE_SERVICE, "1")["gender"] == "M"

    report = feature_store.setup(settings, str(write_tiny(tmp_path)))
    tiny = read_schema(settings.data_dir)
    assert (report.dataset, report.switched) == ("tiny", True)
    assert report.profile_rows == {"user_profile": 1, "item_profile": 2}
    assert tiny.counted_kinds == ("purchase", "view")

    user = online(settings, contracts.USER_FEATURE_SERVICE, "1")
    assert set(user) == {"user_id", "gender", *user_activity_features(tiny)}
    assert all(user[name] is None for name in user if name != "user_id")  # neither ml-100k's gender nor activity
    assert online(settings, contracts.USER_FEATURE_SERVICE, "2")["gender"] == "F"
    item = online(settings, contracts.ITEM_FEATURE_SERVICE, "1")
    assert set(item) == {"item_id", "colour", *item_stats_features(tiny)}
    assert item["colour"] == "red"
    # Redis holds the new dataset's rows only (user 2, items 1 and 2), not 943 + 1682 old ones.
    assert project_keys(settings) == 3
    # The registry's profile views are the new schema's; the push log starts empty.
    assert [f.name for f in store.get_feature_view(contracts.USER_PROFILE_VIEW).features] == ["gender"]
    assert [f.name for f in store.get_feature_view(contracts.ITEM_PROFILE_VIEW).features] == ["colour"]
    history = historical_features(
        store,
        pd.DataFrame({"user_id": ["1"], "event_timestamp": [pd.Timestamp("2023-11-15", tz="UTC")]}),
        contracts.USER_FEATURE_SERVICE,
    )
    assert history.loc[0, "recent_items"] is None and history.loc[0, "gender"] is None
    assert profiles.read_stamp(settings.data_dir) == profiles.DatasetStamp("tiny", tiny)


def test_rerunning_a_dataset_rewrites_profiles_and_keeps_its_activity(
    settings: FeaturesSettings, tmp_path: Path
) -> None:
    dataset = load_dataset(str(write_tiny(tmp_path)))
    assert dataset.users is not None and dataset.items is not None
    store = feature_store.open_store(settings)
    first = feature_store.setup_dataset(store, dataset.name, dataset.schema, dataset.users, dataset.items)
    assert first.switched
    feature_store.push_user_activity(store, activity("2", dataset.schema, ["1"]), offline=False)

    # The same dataset with user 2's row gone and item 1 recoloured (same name, same schema).
    items = dataset.items.assign(colour=["green", "blue"])
    again = feature_store.setup_dataset(store, dataset.name, dataset.schema, dataset.users.iloc[:0], items)
    assert (again.switched, again.profile_rows) == (False, {"user_profile": 0, "item_profile": 2})
    user = online(settings, contracts.USER_FEATURE_SERVICE, "2")
    assert user["gender"] is None  # dropped from the file: dropped online
    assert user["recent_items"] == ["1"]  # its activity stays
    assert online(settings, contracts.ITEM_FEATURE_SERVICE, "1")["colour"] == "green"  # new value, same timestamp


def test_a_log_without_attribute_files_serves_ids_and_streams_only_then_ml100k_comes_back(
    settings: FeaturesSettings, tmp_path: Path
) -> None:
    store = feature_store.open_store(settings)
    feature_store.setup(settings, "ml-100k")
    write_tiny(tmp_path)
    report = feature_store.setup(
        settings, str(tmp_path / "events.csv"), columns="user=who,item=what,timestamp=ts,rating="
    )
    assert (report.dataset, report.switched, report.profile_rows) == ("events", True, {})
    assert sorted(view.name for view in store.list_feature_views()) == [
        contracts.ITEM_STATS_VIEW,
        contracts.USER_ACTIVITY_VIEW,
    ]
    assert set(online(settings, contracts.ITEM_FEATURE_SERVICE, "1")) == {"item_id", *contracts.ITEM_STATS_FEATURES}
    assert project_keys(settings) == 0
    assert not (settings.data_dir / "user_profile.parquet").exists()

    assert feature_store.setup(settings, "ml-100k").switched
    assert online(settings, contracts.ITEM_FEATURE_SERVICE, "1")["genres"] == ["Animation", "Children's", "Comedy"]


def test_features_show_prints_only_the_new_datasets_attributes(
    settings: FeaturesSettings, stack_settings: StackSettings, tmp_path: Path
) -> None:
    env = {
        "STREAMREC_REDIS__PORT": str(stack_settings.redis.port),
        "STREAMREC_PATHS__STATE_DIR": str(settings.paths.state_dir),
        "STREAMREC_FEATURES__PROJECT": settings.features.project,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])),
    }
    runner = CliRunner()
    assert runner.invoke(app, ["setup"], env=env).exit_code == 0  # ml-100k
    before = runner.invoke(app, ["show", "1"], env=env).output
    assert "gender: M" in before and "age: 24.0" in before

    result = runner.invoke(app, ["setup", "--dataset", str(write_tiny(tmp_path))], env=env)
    assert result.exit_code == 0, result.output
    assert "dataset tiny: 3 interactions" in result.output and "cleared" in result.output
    shown = runner.invoke(app, ["show", "1"], env=env).output
    assert "dataset: tiny" in shown and "gender: None" in shown
    assert "age" not in shown and "occupation" not in shown and "zip_prefix" not in shown
    item = runner.invoke(app, ["show-item", "1"], env=env).output
    assert "colour: red" in item and "genres" not in item and "release_year" not in item
    # The setting names the default dataset: switching back needs no option.
    again = runner.invoke(app, ["setup"], env={**env, "STREAMREC_DATASET": str(tmp_path / "tiny.toml")})
    assert again.exit_code == 0 and "cleared" not in again.output
