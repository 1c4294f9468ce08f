"""What ``features/feast_internals.py`` relies on in Feast, checked so that an upgrade breaks here.

Every private Feast name the module uses must have a check below (the first test finds them in
the module's source), each check binds the arguments the module passes to the installed
signature and, where the module depends on a behaviour, asserts it. The last tests keep every
other module of the project away from Feast's internals. The round trip on a real Redis is in
``tests/integration/test_features_store.py``.
"""

from __future__ import annotations

import ast
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from feast import FeatureStore, FeatureView, ValueType
from feast.infra.online_stores.redis import RedisClient, RedisOnlineStore, RedisOnlineStoreConfig, _versioned_fv_name
from feast.infra.provider import Provider
from feast.protos.feast.types.EntityKey_pb2 import EntityKey
from feast.protos.feast.types.Value_pb2 import StringList, Value
from feast.type_map import feast_value_type_to_python_type, python_values_to_proto_values
from google.protobuf.timestamp_pb2 import Timestamp
from redis import Redis

from features import feast_internals, views
from features.settings import FeaturesSettings
from features.store import open_store
from streamrec.core.settings import PROJECT_ROOT, PathSettings, RedisSettings
from streamrec.ops.stack.ports import free_ports

INTERNALS = PROJECT_ROOT / "features" / "feast_internals.py"
SCANNED_PACKAGES = ("streamrec", "streams", "features", "online_trainer", "serving")
INTERNAL_MODULES = ("feast.infra", "feast.protos", "feast.type_map")


@dataclass(frozen=True)
class Feast:
    """A store on a port nothing listens on (no check below talks to Redis) and a stream view."""

    store: FeatureStore
    view: FeatureView
    redis_store: RedisOnlineStore


@pytest.fixture
def feast(tmp_path: Path) -> Feast:
    settings = FeaturesSettings(paths=PathSettings(state_dir=tmp_path), redis=RedisSettings(port=free_ports(1)[0]))
    store = open_store(settings)
    redis_store = feast_internals.provider(store).online_store
    assert isinstance(redis_store, RedisOnlineStore)
    return Feast(store, views.build(tmp_path).user_activity, redis_store)


def bind(function: Callable[..., Any], *args: object, **kwargs: object) -> None:
    """Fail unless ``function`` accepts the arguments as ``feast_internals`` passes them."""
    try:
        inspect.signature(function).bind(*args, **kwargs)
    except TypeError as exc:
        pytest.fail(
            f"{function.__qualname__}{inspect.signature(function)} no longer takes the call in "
            f"features/feast_internals.py ({exc}); adapt the module to this Feast, then the pin."
        )


# -- one check per private name the module uses --------------------------------------------
def check_versioned_fv_name(feast: Feast) -> None:
    bind(_versioned_fv_name, feast.view, feast.store.config)
    # without view versioning, the name in field keys is the view's own
    assert _versioned_fv_name(feast.view, feast.store.config) == feast.view.name


def check_generate_hset_keys_for_features(feast: Feast) -> None:
    names = ["count_1h", "recent_items"]
    bind(feast.redis_store._generate_hset_keys_for_features, feast.view, list(names), fv_name_override="v")
    requested, hset_keys = feast.redis_store._generate_hset_keys_for_features(
        feast.view, list(names), fv_name_override="v"
    )
    # the one-HMGET read slices the reply by these: one field per feature, then the view's timestamp
    assert requested == [*names, "_ts:v"]
    assert len(hset_keys) == len(requested) and hset_keys[-1] == "_ts:v"


def check_generate_redis_keys_for_entities(feast: Feast) -> None:
    keys = [feast_internals.entity_key("user_id", "1"), feast_internals.entity_key("user_id", "2")]
    bind(feast.redis_store._generate_redis_keys_for_entities, feast.store.config, keys)
    redis_keys = feast.redis_store._generate_redis_keys_for_entities(feast.store.config, keys)
    assert len(redis_keys) == 2 and len(set(redis_keys)) == 2 and all(isinstance(k, bytes) for k in redis_keys)
    assert redis_keys[0].endswith(feast.store.config.project.encode())


def check_get_client(feast: Feast) -> None:
    bind(feast.redis_store._get_client, feast.store.config.online_store)
    client = feast.redis_store._get_client(feast.store.config.online_store)  # connects lazily
    # one client per store, kept: the retry policy set on it applies to every later read
    assert isinstance(client, Redis)
    assert feast.redis_store._get_client(feast.store.config.online_store) is client


def check_get_features_for_entity(feast: Feast) -> None:
    requested = ["count_1h", "recent_items", "_ts:v"]
    stored = [Value(int64_val=3).SerializeToString(), None, Timestamp(seconds=100).SerializeToString()]
    bind(feast.redis_store._get_features_for_entity, stored, "v", requested)
    event_time, values = feast.redis_store._get_features_for_entity(stored, "v", list(requested))
    assert event_time == datetime.fromtimestamp(100, UTC)
    assert values == {"count_1h": Value(int64_val=3), "recent_items": Value()}
    # no row at all: epoch 0 and empty values, which the reader turns into ts 0 and None
    event_time, values = feast.redis_store._get_features_for_entity([None, None, None], "v", list(requested))
    assert event_time == datetime.fromtimestamp(0, UTC)
    assert values is not None and [feast_internals.python_value(v) for v in values.values()] == [None, None]


PRIVATE_NAME_CHECKS: dict[str, Callable[[Feast], None]] = {
    "_versioned_fv_name": check_versioned_fv_name,
    "_generate_hset_keys_for_features": check_generate_hset_keys_for_features,
    "_generate_redis_keys_for_entities": check_generate_redis_keys_for_entities,
    "_get_client": check_get_client,
    "_get_features_for_entity": check_get_features_for_entity,
}
# Names no module may use outside feast_internals (it reaches the provider through the public property).
FORBIDDEN_PRIVATE_NAMES = frozenset(PRIVATE_NAME_CHECKS) | {"_get_provider"}


def private_names_used(tree: ast.AST) -> set[str]:
    """``_``-prefixed names taken from other objects or modules: ``obj._x``, ``from m import _x``,
    ``getattr(obj, "_x")`` (``self._x`` and ``cls._x`` are the module's own)."""
    used: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            if not (isinstance(node.value, ast.Name) and node.value.id in {"self", "cls"}):
                used.add(node.attr)
        elif isinstance(node, ast.ImportFrom):
            used.update(alias.name for alias in node.names if alias.name.startswith("_"))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in {"getattr", "hasattr"}:
            if len(node.args) > 1 and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str):
                used.add(node.args[1].value)
    return used


def test_every_private_name_the_module_uses_has_a_check_here() -> None:
    used = private_names_used(ast.parse(INTERNALS.read_text()))
    assert used == set(PRIVATE_NAME_CHECKS), (
        "features/feast_internals.py now uses other private Feast names than this test checks; "
        "add a check per name to PRIVATE_NAME_CHECKS"
    )


@pytest.mark.parametrize("name", sorted(PRIVATE_NAME_CHECKS))
def test_each_private_name_exists_and_takes_the_modules_call(feast: Feast, name: str) -> None:
    PRIVATE_NAME_CHECKS[name](feast)


# -- the internal modules' public parts the module calls ----------------------------------
def test_the_provider_reads_and_writes_take_the_modules_calls(feast: Feast) -> None:
    assert isinstance(inspect.getattr_static(FeatureStore, "provider"), property)
    provider = feast_internals.provider(feast.store)
    assert isinstance(provider, Provider)
    assert provider is feast.store.provider and provider is feast.store._get_provider()  # one per store
    key = feast_internals.entity_key("user_id", "1")
    bind(provider.online_read, config=feast.store.config, table=feast.view, entity_keys=[key], requested_features=[])
    bind(provider.online_write_batch, feast.store.config, feast.view, [], None)


def test_the_one_hmget_plan_is_chosen_by_the_redis_client_setting(feast: Feast) -> None:
    assert isinstance(feast.store.config.online_store, RedisOnlineStoreConfig)
    assert feast.store.config.online_store.client == RedisClient.redis  # the default, which takes the plan
    assert {client.value for client in RedisClient} >= {"redis", "glide"}
    plan = feast_internals.OneHmgetRead.plan(feast.store, [(feast.view, ["count_1h"])])
    assert plan is not None


def test_protos_have_the_fields_the_module_sets() -> None:
    assert {"join_keys", "entity_values"} <= set(EntityKey.DESCRIPTOR.fields_by_name)
    assert {"int64_val", "double_val", "string_val", "string_list_val"} <= set(Value.DESCRIPTOR.fields_by_name)
    assert "val" in StringList.DESCRIPTOR.fields_by_name
    assert feast_internals.entity_key("item_id", "7") == EntityKey(
        join_keys=["item_id"], entity_values=[Value(string_val="7")]
    )
    bind(feast_value_type_to_python_type, Value())


@pytest.mark.parametrize(
    ("value_type", "value"),
    [(ValueType.INT64, 7), (ValueType.DOUBLE, 2.5), (ValueType.STRING, "x"), (ValueType.STRING_LIST, ["3", "1"])],
)
def test_value_builders_give_what_feasts_own_conversion_gives(value_type: ValueType, value: object) -> None:
    built = feast_internals.VALUE_BUILDERS[value_type](value)
    assert built == python_values_to_proto_values([value], value_type)[0]
    assert feast_internals.python_value(built) == value


# -- nobody else touches Feast's internals ---------------------------------------------------
def project_modules() -> Iterator[Path]:
    for package in SCANNED_PACKAGES:
        for path in sorted((PROJECT_ROOT / package).rglob("*.py")):
            if "_generated" not in path.parts:
                yield path


def internals_uses(tree: ast.AST) -> list[str]:
    """Each import of Feast's internal modules and each use of a forbidden private name."""
    found: list[str] = []

    def internal(module: str) -> bool:
        return any(module == name or module.startswith(name + ".") for name in INTERNAL_MODULES)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"import {alias.name}" for alias in node.names if internal(alias.name)]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found += [
                f"from {node.module} import {alias.name}"
                for alias in node.names
                if internal(node.module) or internal(f"{node.module}.{alias.name}")
            ]
    found += [f"uses {name}" for name in sorted(private_names_used(tree) & FORBIDDEN_PRIVATE_NAMES)]
    found += [
        f"names {node.id}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Name) and node.id in FORBIDDEN_PRIVATE_NAMES
    ]
    return found


def test_the_scan_sees_the_internals_module_use_them() -> None:
    """The scan below can fail: it finds every kind of use in the one module allowed them."""
    found = internals_uses(ast.parse(INTERNALS.read_text()))
    assert "from feast.infra.provider import Provider" in found
    assert "from feast.type_map import feast_value_type_to_python_type" in found
    assert {f"uses {name}" for name in PRIVATE_NAME_CHECKS} <= set(found)
    assert internals_uses(ast.parse("import feast.protos.feast.types.Value_pb2\nfrom feast import type_map")) == [
        "import feast.protos.feast.types.Value_pb2",
        "from feast import type_map",
    ]
    assert internals_uses(ast.parse("store._get_provider()")) == ["uses _get_provider"]


def test_no_other_module_uses_feast_internals() -> None:
    offenders = {
        str(path.relative_to(PROJECT_ROOT)): uses
        for path in project_modules()
        if path != INTERNALS and (uses := internals_uses(ast.parse(path.read_text(), filename=str(path))))
    }
    assert len(list(project_modules())) > 50  # the scan reads the whole project
    assert offenders == {}, (
        "Only features/feast_internals.py may use Feast's internal modules and private API; "
        "move these uses there (with a check in tests/unit/test_feast_internals.py)"
    )
