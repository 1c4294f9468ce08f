"""The Feast objects of features/, generated from a dataset's attribute schema, and their settings."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pyarrow as pa
import pytest
from feast import FeatureView

from features import views
from features.settings import FeaturesSettings, FeatureStoreTuning
from streamrec.core import contracts
from streamrec.core.attributes import Attribute, AttributeSchema, write_schema
from streamrec.core.errors import SettingsError
from streamrec.core.settings import PathSettings, known_env_names, load
from streamrec.datasets.description import ML100K_ITEM_ATTRIBUTES, ML100K_USER_ATTRIBUTES

ML100K = AttributeSchema(user=ML100K_USER_ATTRIBUTES, item=ML100K_ITEM_ATTRIBUTES, event_kinds=("rating",))
NO_ATTRIBUTES = AttributeSchema(event_kinds=("view",))
SHOP = AttributeSchema(
    user=(Attribute(name="segment", type="categorical"),),
    item=(
        Attribute(name="category", type="categorical"),
        Attribute(name="tags", type="multi_categorical"),
        Attribute(name="price", type="numeric", boundaries=(5.0, 20.0)),
    ),
    event_kinds=("add_to_cart", "purchase", "view"),
)
KIND_COUNTS = [
    f"{kind}_{window}" for kind in ("add_to_cart", "purchase", "view") for window in ("count_1h", "count_24h")
]


def features_of(view: FeatureView | None) -> dict[str, str]:
    assert view is not None
    return {feature.name: str(feature.dtype) for feature in view.features}


def services_of(built: views.Definitions) -> dict[str, list[str]]:
    return {
        service.name: [projection.name for projection in service.feature_view_projections]
        for service in (built.recommender_user, built.recommender_item)
    }


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
    assert load(FeaturesSettings).dataset == "ml-100k"
    monkeypatch.setenv("STREAMREC_DATASET", "synthetic:events=500")
    assert load(FeaturesSettings).dataset == "synthetic:events=500"
    monkeypatch.setenv("STREAMREC_FEATURES__PROJECT", "other_project")
    assert load(FeaturesSettings).features.project == "other_project"
    monkeypatch.setenv("STREAMREC_FEATURES__PROJECT", "bad name!")
    with pytest.raises(SettingsError, match="features.project"):
        load(FeaturesSettings)
    monkeypatch.delenv("STREAMREC_FEATURES__PROJECT")
    monkeypatch.setenv("STREAMREC_FEATURES__DATADIR", "/x")
    with pytest.raises(SettingsError, match="STREAMREC_FEATURES__DATA_DIR"):
        load(FeaturesSettings)


def test_the_ml100k_schema_gives_typed_profile_views_beside_the_stream_views(tmp_path: Path) -> None:
    built = views.build(tmp_path, ML100K)
    assert features_of(built.user_profile) == {
        "age": "Float64",
        "gender": "String",
        "occupation": "String",
        "zip_prefix": "String",
    }
    assert features_of(built.item_profile) == {"genres": "Array(String)", "release_year": "Float64"}
    # one kind: no per-kind counts
    assert features_of(built.user_activity) == {
        "recent_items": "Array(String)",
        "count_1h": "Int64",
        "count_24h": "Int64",
        "last_event_ts": "Int64",
    }
    assert features_of(built.item_stats) == {"count_1h": "Int64", "count_24h": "Int64", "trending_score": "Float64"}
    assert services_of(built) == {
        contracts.USER_FEATURE_SERVICE: [contracts.USER_PROFILE_VIEW, contracts.USER_ACTIVITY_VIEW],
        contracts.ITEM_FEATURE_SERVICE: [contracts.ITEM_PROFILE_VIEW, contracts.ITEM_STATS_VIEW],
    }
    for view, join_key in (
        (built.user_profile, contracts.USER_JOIN_KEY),
        (built.item_profile, contracts.ITEM_JOIN_KEY),
        (built.user_activity, contracts.USER_JOIN_KEY),
        (built.item_stats, contracts.ITEM_JOIN_KEY),
    ):
        assert view is not None and [column.name for column in view.entity_columns] == [join_key]
    assert built.user_activity_push.name == contracts.USER_ACTIVITY_PUSH
    assert built.item_stats_push.name == contracts.ITEM_STATS_PUSH
    assert built.user_activity.stream_source is built.user_activity_push
    # Profiles hold forever; stream rows reach back at most the stream TTL in point-in-time joins.
    assert built.user_profile is not None and built.item_profile is not None
    assert built.user_profile.ttl == timedelta(0) and built.item_profile.ttl == timedelta(0)
    assert built.user_activity.ttl == built.item_stats.ttl == views.STREAM_TTL == timedelta(days=30)
    assert "MovieLens" not in " ".join(entity.description for entity in (built.user, built.item))


def test_a_schema_without_attributes_has_no_profile_views(tmp_path: Path) -> None:
    built = views.build(tmp_path, NO_ATTRIBUTES)
    assert built.user_profile is None and built.item_profile is None
    assert built.profile_views == []
    assert services_of(built) == {
        contracts.USER_FEATURE_SERVICE: [contracts.USER_ACTIVITY_VIEW],
        contracts.ITEM_FEATURE_SERVICE: [contracts.ITEM_STATS_VIEW],
    }
    names = [getattr(obj, "name", None) for obj in built.objects()]
    assert contracts.USER_PROFILE_VIEW not in names and contracts.ITEM_PROFILE_VIEW not in names
    assert None not in names


def test_declared_types_and_counted_kinds_shape_every_view(tmp_path: Path) -> None:
    built = views.build(tmp_path, SHOP)
    assert features_of(built.user_profile) == {"segment": "String"}
    assert features_of(built.item_profile) == {"category": "String", "tags": "Array(String)", "price": "Float64"}
    assert list(features_of(built.user_activity)) == [
        "recent_items",
        "count_1h",
        "count_24h",
        "last_event_ts",
        *KIND_COUNTS,
    ]
    assert list(features_of(built.item_stats)) == ["count_1h", "count_24h", "trending_score", *KIND_COUNTS]
    assert {features_of(built.item_stats)[name] for name in KIND_COUNTS} == {"Int64"}
    # Only some sides declared: a user side alone still gives a user profile, and no item one.
    user_only = views.build(tmp_path, SHOP.model_copy(update={"item": ()}))
    assert user_only.user_profile is not None and user_only.item_profile is None
    assert services_of(user_only)[contracts.ITEM_FEATURE_SERVICE] == [contracts.ITEM_STATS_VIEW]


@pytest.mark.parametrize("schema", [ML100K, NO_ATTRIBUTES, SHOP], ids=["ml-100k", "none", "shop"])
def test_stream_view_arrow_schemas_match_the_feature_views(tmp_path: Path, schema: AttributeSchema) -> None:
    built = views.build(tmp_path, schema)
    pairs = ((views.user_activity_view(schema), built.user_activity), (views.item_stats_view(schema), built.item_stats))
    arrow = {"Int64": pa.int64(), "Float64": pa.float64(), "Array(String)": pa.list_(pa.string())}
    for stream, view in pairs:
        assert stream.feature_names == [feature.name for feature in view.features]
        assert [stream.schema.field(f.name).type for f in view.features] == [arrow[str(f.dtype)] for f in view.features]
        assert stream.schema.names[0] == stream.join_key and stream.schema.field(stream.join_key).type == pa.string()
        assert stream.schema.field(views.EVENT_TIMESTAMP).type == pa.timestamp("us", tz="UTC")
        assert view.stream_source is not None and view.stream_source.name == stream.push_source
    assert views.stream_views(schema) == (pairs[0][0], pairs[1][0])


def test_profile_arrow_schemas_follow_the_attribute_types() -> None:
    item = views.profile_arrow_schema(SHOP, "item")
    assert item.names == ["item_id", "category", "tags", "price", views.EVENT_TIMESTAMP]
    assert [item.field(name).type for name in ("category", "tags", "price")] == [
        pa.string(),
        pa.list_(pa.string()),
        pa.float64(),
    ]


def test_sources_are_absolute_paths_under_the_data_dir(tmp_path: Path) -> None:
    built = views.build(tmp_path / "sub" / ".." / "data", ML100K)
    data_dir = (tmp_path / "data").resolve()
    assert built.user_profile is not None
    assert built.user_profile.batch_source.path == str(data_dir / "user_profile.parquet")
    assert built.user_activity.batch_source.path == str(data_dir / "push_log" / "user_activity")


def test_without_a_schema_argument_the_data_dirs_own_schema_is_used(tmp_path: Path) -> None:
    assert views.build(tmp_path).profile_views == []  # no attribute_schema.json yet
    write_schema(tmp_path, SHOP)
    built = views.build(tmp_path)
    assert built.schema == SHOP and features_of(built.user_profile) == {"segment": "String"}


def test_the_feast_cli_scan_imports_only_definitions_py() -> None:
    """A new module in features/ must be added to .feastignore, or `feast apply` imports it."""
    from feast.repo_operations import get_repo_files

    from streamrec.core.settings import PROJECT_ROOT

    repo = PROJECT_ROOT / "features"
    assert get_repo_files(repo) == [(repo / "definitions.py").resolve()]
