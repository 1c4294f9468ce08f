"""The Feast CLI on the checked-in repo, and ``streamrec features ...`` on the local stack."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from feast import FeatureStore
from typer.testing import CliRunner

from features.cli import app, render_feature_store_yaml
from features.settings import FeaturesSettings, FeatureStoreTuning
from features.store import repo_config
from streamrec.core import contracts
from streamrec.core.attributes import Attribute, AttributeSchema, item_stats_features, write_schema
from streamrec.core.settings import PROJECT_ROOT, PathSettings, RedisSettings
from streamrec.datasets.description import ML100K_ITEM_ATTRIBUTES, ML100K_USER_ATTRIBUTES
from streamrec.ops.settings import StackSettings
from streamrec.ops.stack.ports import free_ports

FEAST = str(Path(sys.executable).parent / "feast")
STREAM_VIEWS = [contracts.ITEM_STATS_VIEW, contracts.USER_ACTIVITY_VIEW]
VIEWS = sorted([contracts.USER_PROFILE_VIEW, contracts.ITEM_PROFILE_VIEW, *STREAM_VIEWS])
SHOP = AttributeSchema(
    item=(
        Attribute(name="category", type="categorical"),
        Attribute(name="tags", type="multi_categorical"),
        Attribute(name="price", type="numeric", boundaries=(5.0,)),
    ),
    event_kinds=("add_to_cart", "purchase", "view"),
)
SCHEMAS = {
    "none": (None, STREAM_VIEWS),
    "ml-100k": (AttributeSchema(user=ML100K_USER_ATTRIBUTES, item=ML100K_ITEM_ATTRIBUTES), VIEWS),
    "shop": (SHOP, sorted([contracts.ITEM_PROFILE_VIEW, *STREAM_VIEWS])),
}


def registered(settings: FeaturesSettings) -> tuple[list[str], list[str]]:
    """Views and services in the registry the settings name (read without the CLI)."""
    store = FeatureStore(config=repo_config(settings))
    return (
        sorted(view.name for view in store.list_feature_views()),
        sorted(service.name for service in store.list_feature_services()),
    )


@pytest.mark.parametrize("schema_name", list(SCHEMAS))
def test_feast_apply_works_on_a_checkout_for_each_schema_with_redis_down(tmp_path: Path, schema_name: str) -> None:
    """`feast -c features apply` on a copy of the repo folder, nothing on Redis's port: on a clean
    checkout (no schema: stream views only) and after `features setup` wrote a schema."""
    schema, expected_views = SCHEMAS[schema_name]
    checkout = tmp_path / "checkout"
    if schema is not None:
        write_schema(checkout / ".state" / "feast", schema)
    shutil.copytree(PROJECT_ROOT / "features", checkout / "features", ignore=shutil.ignore_patterns("__pycache__"))
    yaml_path = checkout / "features" / "feature_store.yaml"
    dead_port = free_ports(1)[0]
    yaml_path.write_text(yaml_path.read_text().replace("127.0.0.1:6379", f"127.0.0.1:{dead_port}"))
    env = {
        **os.environ,
        "STREAMREC_PATHS__STATE_DIR": str(checkout / ".state"),
        # The copy's definitions.py imports the `features` package of this checkout.
        "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])),
    }
    completed = subprocess.run(
        [FEAST, "-c", "features", "apply"], cwd=checkout, env=env, capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    # The yaml's relative registry path and the settings' default agree: .state/feast/registry.db.
    settings = FeaturesSettings(paths=PathSettings(state_dir=checkout / ".state"), redis=RedisSettings(port=dead_port))
    assert settings.registry_path.is_file()
    assert registered(settings) == (expected_views, [contracts.ITEM_FEATURE_SERVICE, contracts.USER_FEATURE_SERVICE])
    item_stats = FeatureStore(config=repo_config(settings)).get_feature_view(contracts.ITEM_STATS_VIEW)
    assert [feature.name for feature in item_stats.features] == list(item_stats_features(schema or AttributeSchema()))


def test_the_yaml_rendered_from_settings_names_them(tmp_path: Path) -> None:
    settings = FeaturesSettings(
        paths=PathSettings(state_dir=tmp_path), redis=RedisSettings(host="redis.internal", port=7000, db=2)
    )
    text = render_feature_store_yaml(settings)
    assert 'connection_string: "redis.internal:7000,db=2"' in text
    assert f"path: {tmp_path.resolve() / 'feast' / 'registry.db'}" in text


def test_setup_show_and_the_feast_passthrough_on_the_stack(
    local_stack: object, stack_settings: StackSettings, tmp_path: Path
) -> None:
    project = f"t{uuid.uuid4().hex[:10]}"
    env = {
        "STREAMREC_REDIS__PORT": str(stack_settings.redis.port),
        "STREAMREC_PATHS__STATE_DIR": str(tmp_path),
        "STREAMREC_FEATURES__PROJECT": project,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])),
    }
    runner = CliRunner()
    result = runner.invoke(app, ["setup"], env=env)
    assert result.exit_code == 0, result.output
    assert "dataset ml-100k: 100,000 interactions" in result.output
    assert "{'user_profile': 943, 'item_profile': 1682}" in result.output
    shown = runner.invoke(app, ["show", "1"], env=env)
    assert shown.exit_code == 0, shown.output
    assert "occupation: technician" in shown.output and "age: 24.0" in shown.output
    item = runner.invoke(app, ["show-item", "1"], env=env)
    assert "release_year: 1995.0" in item.output and "genres: ['Animation'" in item.output
    # The Feast CLI through settings: re-applying on the stack's Redis changes nothing.
    passthrough = runner.invoke(app, ["feast", "--", "apply"], env=env)
    assert passthrough.exit_code == 0, passthrough.output
    settings = FeaturesSettings(
        paths=PathSettings(state_dir=tmp_path), redis=stack_settings.redis, features=FeatureStoreTuning(project=project)
    )
    assert registered(settings)[0] == VIEWS


def test_a_dead_redis_is_reported_with_the_fix(tmp_path: Path) -> None:
    env = {"STREAMREC_REDIS__PORT": str(free_ports(1)[0]), "STREAMREC_PATHS__STATE_DIR": str(tmp_path)}
    result = CliRunner().invoke(app, ["setup"], env=env)
    assert result.exit_code != 0
    assert "does not answer" in str(result.exception) and "streamrec stack up" in str(result.exception)


def test_help_lists_every_command() -> None:
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("setup", "show", "show-item", "compact", "feast"):
        assert command in result.output
    setup = CliRunner().invoke(app, ["setup", "--help"])
    assert "--dataset" in setup.output and "STREAMREC_DATASET" in setup.output
