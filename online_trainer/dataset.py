"""The bootstrap training set, built through Feast's point-in-time join.

``streamrec train --until T`` learns from every interaction up to ``T``. Each interaction becomes
one example whose user inputs come from the ``recommender_user_v1`` feature service via
``features.history.historical_features`` (Feast's point-in-time semantics over the registry's views;
it stands in for ``FeatureStore.get_historical_features``, whose file store drops rows and crashes
on the push log, see that module): the user's declared attributes (``user_profile``, one feature
per attribute of the schema), and the ``user_activity`` row the Faust worker pushed for the state
*before* the interaction (recent items, window counts and, with several event kinds, each
kind's). Feast's join takes rows with ``feature_ts <= entity_ts``, so the entity timestamp decides what is visible:

* The worker stamps the state after an event with the event time, nudged by one microsecond per
  earlier event of the same user at the same instant (``streams/windows.py``, ``version_us``:
  Feast's Redis keeps only strictly newer rows). So the state that includes the ``k``-th event
  (0-based, file order) of a user at instant ``t`` is stamped at least ``t + k`` microseconds.
* The entity timestamp of that event is ``t + k µs - 1 µs``: strictly before its own state (no
  label leak: a row that contains the item being learned is never joined), and at or after the
  states of the earlier events, including earlier events in the same second. ml-100k users rate
  in bursts (about half the events follow another one of the same user in the same second), so
  this matters: with plain ``t - 1 µs`` half the examples would miss their burst's history.

Fallback: the stream views only have history if the worker's pushes were logged offline
(``features.push_log``). When too few examples find an activity row (share below
``trainer.min_feature_coverage``; e.g. nothing was pushed yet), the sequential features are
computed from the interaction log itself with ``examples.examples_from_interactions`` (same window
semantics), attributes still come from Feast, and :class:`DatasetInfo` says so; it goes into the
version's lineage.

The catalog comes from ``recommender_item_v1`` (``item_profile``: the item attributes) for every
item of the profile table, plus items that only appear in the interactions (unknown values); a
dataset without item attributes has no ``item_profile`` view, and its catalog is the items seen.
Which attributes: the schema ``streamrec features setup --dataset`` wrote
(``streamrec.core.attributes.read_schema``), passed in by the caller.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from features.history import historical_features
from online_trainer.attribute_values import frame_column
from online_trainer.catalog import ItemCatalog
from online_trainer.examples import (
    count_columns,
    example_columns,
    examples_from_interactions,
    interaction_kinds,
    positive_examples,
)
from streamrec.core import contracts
from streamrec.core.attributes import AttributeSchema
from streamrec.core.errors import DatasetError

if TYPE_CHECKING:
    from feast import FeatureStore

ENTITY_TIMESTAMP = "event_timestamp"
_ROW = "__row"


@dataclass(frozen=True)
class DatasetInfo:
    """Where a training set came from; recorded in the version's lineage."""

    feature_service: str
    features_source: str  # "feast" or "interaction_log"
    rows: int
    users: int
    data_start: str | None
    data_end: str | None
    activity_coverage: float | None
    note: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def interactions_until(interactions: pd.DataFrame, until: datetime | None) -> pd.DataFrame:
    """The interaction frame's rows with ``event_time <= until`` (all of them when None)."""
    if until is None:
        return interactions
    cutoff = pd.Timestamp(until)
    cutoff = cutoff.tz_localize("UTC") if cutoff.tzinfo is None else cutoff.tz_convert("UTC")
    return interactions.loc[interactions["event_time"] <= cutoff].reset_index(drop=True)


def holdout_rows(examples: pd.DataFrame, holdout_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Row positions of (train, holdout), each in event-time order (stable): the newest
    ``min(holdout_size, n // 5)`` examples are held out."""
    order = examples["event_time"].argsort(kind="stable").to_numpy()
    size = min(holdout_size, len(order) // 5)
    return order[: len(order) - size], order[len(order) - size :]


def split_holdout(examples: pd.DataFrame, holdout_size: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, holdout) frames of :func:`holdout_rows`, in event-time order."""
    train_rows, held_rows = holdout_rows(examples, holdout_size)
    return examples.iloc[train_rows].reset_index(drop=True), examples.iloc[held_rows].reset_index(drop=True)


def _as_str_list(value: Any) -> list[str]:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return []
    return [str(item) for item in value if item is not None and str(item)]


def historical_user_features(store: FeatureStore, interactions: pd.DataFrame) -> pd.DataFrame:
    """One row per interaction (same order): the feature service's values just before it (module docstring)."""
    event_time = pd.to_datetime(interactions["event_time"], utc=True)
    users = interactions["user_id"].astype(str)
    earlier_same_instant = (
        interactions.assign(user_id=users, event_time=event_time)
        .groupby(["user_id", "event_time"], sort=False)
        .cumcount()
    )
    requests = pd.DataFrame(
        {
            contracts.USER_JOIN_KEY: users.to_numpy(),
            ENTITY_TIMESTAMP: event_time + pd.to_timedelta(earlier_same_instant.to_numpy() - 1, unit="us"),
        }
    )
    entity_df = requests.drop_duplicates().reset_index(drop=True)  # see historical_features
    entity_df[_ROW] = np.arange(len(entity_df), dtype=np.int64)
    joined = historical_features(store, entity_df, contracts.USER_FEATURE_SERVICE)
    result = requests.merge(joined, on=[contracts.USER_JOIN_KEY, ENTITY_TIMESTAMP], how="left", validate="many_to_one")
    return result.drop(columns=[_ROW])


def _prior_event_expected(interactions: pd.DataFrame) -> np.ndarray:
    """True where the user had an earlier event (so an activity row should exist before this one)."""
    return (interactions.groupby("user_id", sort=False).cumcount() > 0).to_numpy()


def _feature(joined: pd.DataFrame, name: str, service: str) -> pd.Series:
    if name not in joined.columns:
        raise DatasetError(
            f"feature service {service} has no feature {name!r} the attribute schema declares; "
            "rerun `streamrec features setup --dataset ...` for this dataset"
        )
    return joined[name]


def build_examples(
    store: FeatureStore, interactions: pd.DataFrame, *, min_coverage: float, schema: AttributeSchema
) -> tuple[pd.DataFrame, DatasetInfo]:
    """The example frame (``examples.example_columns(schema)``, every kind) for ``interactions``
    and how it was built."""
    if interactions.empty:
        raise DatasetError("no interactions to train on; check --until and the dataset")
    interactions = interactions.sort_values("event_time", kind="stable").reset_index(drop=True)
    joined = historical_user_features(store, interactions)
    service = contracts.USER_FEATURE_SERVICE
    examples = pd.DataFrame({"user_id": interactions["user_id"].astype(str)})
    for attribute in schema.user:
        examples[attribute.name] = frame_column(attribute, _feature(joined, attribute.name, service))
    found = joined["last_event_ts"].notna().to_numpy()
    expected = _prior_event_expected(interactions)
    coverage = float(found[expected].mean()) if expected.any() else 1.0
    if coverage >= min_coverage:
        source = "feast"
        note = f"user_activity from the offline push log for {coverage:.1%} of examples with prior events"
        examples["recent_items"] = [_as_str_list(value) for value in joined["recent_items"]]
        for name in count_columns(schema):
            examples[name] = pd.to_numeric(_feature(joined, name, service)).fillna(0).astype("int64").to_numpy()
    else:
        source = "interaction_log"
        note = (
            f"only {coverage:.1%} of examples with prior events found a user_activity row offline "
            f"(< {min_coverage:.0%}): recent_items and counts recomputed from the interaction log "
            "with examples.examples_from_interactions; attributes from Feast"
        )
        replayed = examples_from_interactions(interactions, None, schema)
        examples["recent_items"] = replayed["recent_items"].to_numpy()
        for name in count_columns(schema):
            examples[name] = replayed[name].to_numpy()
    examples["item_id"] = interactions["item_id"].astype(str).to_numpy()
    examples["kind"] = interaction_kinds(interactions, schema)
    examples["event_time"] = pd.to_datetime(interactions["event_time"], utc=True).to_numpy()
    examples["event_time"] = pd.to_datetime(examples["event_time"], utc=True)
    info = DatasetInfo(
        feature_service=service,
        features_source=source,
        rows=len(examples),
        users=int(examples["user_id"].nunique()),
        data_start=interactions["event_time"].min().isoformat(),
        data_end=interactions["event_time"].max().isoformat(),
        activity_coverage=coverage,
        note=note,
    )
    return examples[list(example_columns(schema))], info


def catalog_from_feast(
    store: FeatureStore, at: datetime, schema: AttributeSchema, extra_item_ids: list[str] | None = None
) -> ItemCatalog:
    """Every item of ``item_profile`` with its attributes as of ``at``, through ``recommender_item_v1``.

    ``extra_item_ids`` (e.g. items seen in interactions) missing from the profiles are appended
    with unknown values, so the model can still rank them (by id). Without item attributes in
    ``schema`` there is no ``item_profile`` view: the catalog is ``extra_item_ids``.
    """
    if not schema.item:
        return ItemCatalog.from_items_seen(extra_item_ids or [], schema)
    view = store.get_feature_view(contracts.ITEM_PROFILE_VIEW)
    path = getattr(view.batch_source, "path", None)
    if not path:
        raise DatasetError(f"{contracts.ITEM_PROFILE_VIEW} has no file source; run `streamrec features setup`")
    try:
        item_ids = pd.read_parquet(path, columns=[contracts.ITEM_JOIN_KEY])[contracts.ITEM_JOIN_KEY].astype(str)
    except (FileNotFoundError, OSError) as exc:
        raise DatasetError(f"{path} cannot be read ({exc}); run `streamrec features setup` to write it") from exc
    item_ids = item_ids.drop_duplicates().reset_index(drop=True)
    timestamp = pd.Timestamp(at)
    timestamp = timestamp.tz_localize("UTC") if timestamp.tzinfo is None else timestamp.tz_convert("UTC")
    entity_df = pd.DataFrame(
        {_ROW: np.arange(len(item_ids)), contracts.ITEM_JOIN_KEY: item_ids, ENTITY_TIMESTAMP: timestamp}
    )
    joined = historical_features(store, entity_df, contracts.ITEM_FEATURE_SERVICE).sort_values(_ROW)
    items = pd.DataFrame({"item_id": joined[contracts.ITEM_JOIN_KEY].astype(str).to_numpy()})
    for attribute in schema.item:
        items[attribute.name] = _feature(joined, attribute.name, contracts.ITEM_FEATURE_SERVICE).to_numpy()
    return ItemCatalog.for_dataset(items, extra_item_ids or [], schema)


@dataclass(frozen=True)
class TrainingRows:
    """What a bootstrap trains and gates on: the examples of the learned kinds, their time-ordered
    split into ``fit`` and ``holdout``, the catalog the model ranks, and where the features came from."""

    examples: pd.DataFrame
    fit: pd.DataFrame
    holdout: pd.DataFrame
    catalog: ItemCatalog
    info: DatasetInfo


def training_rows(
    store: FeatureStore,
    history: pd.DataFrame,
    until: datetime,
    schema: AttributeSchema,
    *,
    positive_kinds: tuple[str, ...] | None,
    holdout_size: int,
    min_coverage: float,
    catalog_item_ids: pd.Series | None = None,
) -> TrainingRows:
    """The bootstrap's rows from ``history`` (interactions up to ``until``): Feast's point-in-time
    examples, those of ``positive_kinds``, the newest ``holdout_size`` held out, and the catalog as
    of ``until`` plus every item of ``catalog_item_ids`` (default: the history's items)."""
    every_kind, info = build_examples(store, history, min_coverage=min_coverage, schema=schema)
    examples = positive_examples(every_kind, positive_kinds)
    if examples.empty:
        raise DatasetError(f"no interaction of the learned kinds {positive_kinds} up to {until}")
    items = history["item_id"] if catalog_item_ids is None else catalog_item_ids
    catalog = catalog_from_feast(store, until, schema, extra_item_ids=items.astype(str).unique().tolist())
    fit, holdout = split_holdout(examples, holdout_size)
    return TrainingRows(examples, fit, holdout, catalog, info)
