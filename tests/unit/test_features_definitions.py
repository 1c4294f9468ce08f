"""The Feast objects and settings of features/: names and shapes follow streamrec.core.contracts."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pyarrow as pa
import pytest

from features import views
from features.settings import FeaturesSettings, FeatureStoreTuning
from streamrec.core import contracts
from streamrec.core.errors import SettingsError
from streamrec.core.settings import PathSettings, known_env_names, load


def test_data_dir_and_registry_follow_the_state_dir_unless_set(tmp_path: Path) -> None:
    settings = FeaturesSettings(paths=PathSettings(state_dir=tmp_path))
    assert settings.data_dir == tmp_path / "feast"
    assert settings.registry_path == tmp_path / "feast" / "registry.db"
    assert settings.features.max_feature_age_s == 24 * 3600
    moved = FeaturesSettings(
        paths=PathSettings(state_dir=tmp_path),
        features=FeatureStoreTuning(data_dir=tmp_path / "d", registry_path=tmp_path / "r.db"),
    )
    assert (moved.data_dir, moved.registry_path) == (tmp_path / "d", tmp_path / "r.db")


def test_feature_settings_come_from_the_environment_and_reject_typos(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "STREAMREC_FEATURES__DATA_DIR" in known_env_names()
    monkeypatch.setenv("STREAMREC_FEATURES__PROJECT", "other_project")
    assert load(FeaturesSettings).features.project == "other_project"
    monkeypatch.setenv("STREAMREC_FEATURES__PROJECT", "bad name!")
    with pytest.raises(SettingsError, match="features.project"):
        load(FeaturesSettings)
    monkeypatch.delenv("STREAMREC_FEATURES__PROJECT")
    monkeypatch.setenv("STREAMREC_FEATURES__DATADIR", "/x")
    with pytest.raises(SettingsError, match="STREAMREC_FEATURES__DATA_DIR"):
        load(FeaturesSettings)


def test_views_and_services_use_the_contract_names_and_features(tmp_path: Path) -> None:
    built = views.build(tmp_path)
    expected = {
        contracts.USER_PROFILE_VIEW: (contracts.USER_PROFILE_FEATURES, contracts.USER_JOIN_KEY),
        contracts.ITEM_PROFILE_VIEW: (contracts.ITEM_PROFILE_FEATURES, contracts.ITEM_JOIN_KEY),
        contracts.USER_ACTIVITY_VIEW: (contracts.USER_ACTIVITY_FEATURES, contracts.USER_JOIN_KEY),
        contracts.ITEM_STATS_VIEW: (contracts.ITEM_STATS_FEATURES, contracts.ITEM_JOIN_KEY),
    }
    for view in (built.user_profile, built.item_profile, built.user_activity, built.item_stats):
        features, join_key = expected[view.name]
        assert sorted(feature.name for feature in view.features) == sorted(features)
        assert [column.name for column in view.entity_columns] == [join_key]
    dtypes = {
        f"{v.name}:{f.name}": str(f.dtype) for v in built.profile_views + [built.user_activity] for f in v.features
    }
    assert dtypes["user_activity:recent_items"] == "Array(String)"
    assert dtypes["user_activity:count_1h"] == "Int64"
    assert dtypes["item_profile:genres"] == "Array(String)"
    assert {str(f.dtype) for f in built.item_stats.features if f.name == "trending_score"} == {"Float64"}

    services = {
        s.name: [p.name for p in s.feature_view_projections] for s in (built.recommender_user, built.recommender_item)
    }
    assert services == {
        contracts.USER_FEATURE_SERVICE: [contracts.USER_PROFILE_VIEW, contracts.USER_ACTIVITY_VIEW],
        contracts.ITEM_FEATURE_SERVICE: [contracts.ITEM_PROFILE_VIEW, contracts.ITEM_STATS_VIEW],
    }
    assert built.user_activity_push.name == contracts.USER_ACTIVITY_PUSH
    assert built.item_stats_push.name == contracts.ITEM_STATS_PUSH
    assert built.user_activity.stream_source is built.user_activity_push
    # Profiles hold forever; stream rows reach back at most the stream TTL in point-in-time joins.
    assert built.user_profile.ttl == timedelta(0) and built.item_profile.ttl == timedelta(0)
    assert built.user_activity.ttl == built.item_stats.ttl == views.STREAM_TTL == timedelta(days=30)


def test_sources_are_absolute_paths_under_the_data_dir(tmp_path: Path) -> None:
    built = views.build(tmp_path / "sub" / ".." / "data")
    data_dir = (tmp_path / "data").resolve()
    assert built.user_profile.batch_source.path == str(data_dir / "user_profile.parquet")
    assert built.user_activity.batch_source.path == str(data_dir / "push_log" / "user_activity")


def test_stream_view_arrow_schemas_match_the_feature_views(tmp_path: Path) -> None:
    built = views.build(tmp_path)
    for stream, view in ((views.USER_ACTIVITY, built.user_activity), (views.ITEM_STATS, built.item_stats)):
        assert stream.feature_names == [feature.name for feature in view.features]
        assert stream.schema.field(views.EVENT_TIMESTAMP).type == pa.timestamp("us", tz="UTC")
        assert stream.schema.field(stream.join_key).type == pa.string()
    assert views.USER_ACTIVITY.schema.field("recent_items").type == pa.list_(pa.string())


def test_the_feast_cli_scan_imports_only_definitions_py() -> None:
    """A new module in features/ must be added to .feastignore, or `feast apply` imports it."""
    from feast.repo_operations import get_repo_files

    from streamrec.core.settings import PROJECT_ROOT

    repo = PROJECT_ROOT / "features"
    assert get_repo_files(repo) == [(repo / "definitions.py").resolve()]
