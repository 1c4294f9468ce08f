"""What ``bench.recommend_load`` serves: a dataset's features in Feast and a model version for them.

* **Features**: ``features.store.setup_dataset`` with the dataset's schema (profiles of its declared
  attributes, so the API sends exactly the inputs the model's signatures take), then one fresh
  ``user_activity`` row per user (their last items, newest first, as the stream worker writes it)
  and ``item_stats`` for every item seen, so every request reads a real row.
* **Model** (:class:`ServedModel`): the tests' tiny model over the dataset's catalog (answers
  computable by hand, loads in a second); a real export, ``online_trainer.export.export_version``
  of an untrained ``build_model(ItemCatalog.for_dataset(...), ModelConfig(attributes=schema))``:
  the trainer's own serving graph, catalog and warm-up, so the latency is a trained version's
  (training changes weights, not the work per request); or a SavedModel exported elsewhere, whose
  schema must give the inputs the dataset's features give.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from streamrec.core import contracts
from streamrec.core.attributes import AttributeSchema, kind_count_feature, read_schema, user_model_inputs
from streamrec.datasets.description import Dataset

ModelKind = Literal["tiny", "export", "dir"]
# What every activity row says about the windows (the totals; per-kind counts come from the
# user's own last events): the request path reads them, their values change no latency.
COUNT_1H, COUNT_24H = 3, 12


def user_activity(dataset: Dataset, now: pd.Timestamp) -> pd.DataFrame:
    """One fresh ``user_activity`` row per user: the last distinct items (newest first), counts."""
    interactions = dataset.interactions.sort_values("event_time", kind="stable")
    interactions = interactions.assign(user_id=interactions["user_id"].astype(str))
    recent = (
        interactions.groupby("user_id", sort=False)["item_id"]
        .agg(lambda items: list(dict.fromkeys(reversed(items.astype(str).tolist())))[: contracts.RECENT_ITEMS_MAX])
        .rename("recent_items")
        .reset_index()
    )
    recent["count_1h"] = COUNT_1H
    recent["count_24h"] = COUNT_24H
    for window, last in (("count_1h", COUNT_1H), ("count_24h", COUNT_24H)):
        tail = interactions.groupby("user_id", sort=False).tail(last)
        for kind in dataset.schema.counted_kinds:
            counts = tail[tail["kind"] == kind].groupby("user_id").size()
            recent[kind_count_feature(kind, window)] = recent["user_id"].map(counts).fillna(0).astype("int64")
    recent["last_event_ts"] = int(now.timestamp())
    recent["event_timestamp"] = now
    return recent


def item_stats(dataset: Dataset, now: pd.Timestamp) -> pd.DataFrame:
    """One fresh ``item_stats`` row per item seen: the log's counts as the last day, a random last hour."""
    interactions = dataset.interactions.assign(item_id=dataset.interactions["item_id"].astype(str))
    counts = interactions.groupby("item_id").size()
    rng = np.random.default_rng(7)
    stats = pd.DataFrame(
        {"item_id": counts.index, "count_1h": rng.integers(0, 20, len(counts)), "count_24h": counts.to_numpy()}
    )
    stats["trending_score"] = stats["count_1h"] / (1 + stats["count_24h"] / 24)
    for kind in dataset.schema.counted_kinds:
        of_kind = interactions[interactions["kind"] == kind].groupby("item_id").size()
        day = stats["item_id"].map(of_kind).fillna(0).astype("int64")
        stats[kind_count_feature(kind, "count_24h")] = day
        stats[kind_count_feature(kind, "count_1h")] = (stats["count_1h"] * day // stats["count_24h"]).astype("int64")
    stats["event_timestamp"] = now
    return stats


def set_up_features(settings: Any, dataset: Dataset) -> pd.DataFrame:
    """The dataset's profiles, activity and item stats in the store; returns the activity rows."""
    from features import store as feature_store

    store = feature_store.open_store(settings)
    feature_store.setup_dataset(store, dataset.name, dataset.schema, dataset.users, dataset.items)
    now = pd.Timestamp.now(tz="UTC")
    activity = user_activity(dataset, now)
    feature_store.push_user_activity(store, activity, schema=dataset.schema, offline=False)
    # Logged offline as the worker does by default (streams.push_offline): the API's trending
    # refresh reads the stats of the logged items only.
    feature_store.push_item_stats(store, item_stats(dataset, now), schema=dataset.schema, offline=True)
    return activity


@dataclass(frozen=True)
class ServedModel:
    """The model the benchmark publishes: every version is the same graph (tiny: a new bias each)."""

    kind: ModelKind
    item_ids: list[str]
    schema: AttributeSchema
    source: Path | None = None  # export / dir: the version directory each version copies

    def write(self, base_path: Path, version: int) -> None:
        """``<base_path>/<version>`` in one rename, as the trainer's export lands it."""
        if self.source is None:
            from tests.support.tiny_model import write_tiny_model

            write_tiny_model(base_path, version, item_ids=self.item_ids, bias=version * 0.01, schema=self.schema)
            return
        staging = base_path / f".tmp-{version}"
        shutil.copytree(self.source, staging)
        os.rename(staging, base_path / str(version))

    def describe(self) -> str:
        items = f"{len(self.item_ids):,} items"
        if self.kind == "tiny":
            return f"the tests' tiny model over {items}"
        if self.kind == "export":
            return (
                f"the trainer's two-tower model over {items}, untrained, written by online_trainer.export."
                "export_version (default ModelConfig with the dataset's attributes)"
            )
        return f"SavedModel {self.source}"


def exported_model(dataset: Dataset, activity: pd.DataFrame, workdir: Path) -> ServedModel:
    """An untrained model for ``dataset`` through the trainer's export path (version 1 under ``workdir``)."""
    from online_trainer.catalog import ItemCatalog
    from online_trainer.export import export_version
    from online_trainer.model import build_model
    from online_trainer.model_config import ModelConfig

    catalog = ItemCatalog.for_dataset(dataset.items, dataset.interactions["item_id"].astype(str), dataset.schema)
    model = build_model(catalog, ModelConfig(attributes=dataset.schema))
    warmup = activity.head(16)
    if dataset.users is not None:
        warmup = warmup.merge(
            dataset.users.assign(user_id=dataset.users["user_id"].astype(str)), on="user_id", how="left"
        )
    lineage = {"source": "bench.recommend_load", "dataset": dataset.name, "trained": False}
    version_dir = export_version(model, workdir, 1, lineage=lineage, warmup_users=warmup)
    return ServedModel("export", list(catalog.item_ids), dataset.schema, version_dir)


def model_from_dir(dataset: Dataset, model_dir: Path) -> ServedModel:
    """A SavedModel exported elsewhere; its inputs must be the ones the dataset's features give."""
    schema = read_schema(model_dir / "assets.extra")
    wanted, given = user_model_inputs(schema), user_model_inputs(dataset.schema)
    if wanted != given:
        raise SystemExit(
            f"{model_dir} reads the user inputs {wanted}, but dataset {dataset.name!r} gives {given}; "
            "pass the --dataset the model was trained on"
        )
    return ServedModel("dir", dataset.item_ids, dataset.schema, model_dir)


def served_model(
    kind: ModelKind, dataset: Dataset, activity: pd.DataFrame, workdir: Path, model_dir: Path | None
) -> ServedModel:
    """The model of ``kind`` (``dir``: ``model_dir``) for ``dataset``."""
    if kind == "dir":
        if model_dir is None:
            raise SystemExit("a model of kind 'dir' needs --model-dir")
        return model_from_dir(dataset, model_dir)
    if kind == "export":
        return exported_model(dataset, activity, workdir)
    return ServedModel("tiny", [str(item) for item in dataset.item_ids], dataset.schema)
