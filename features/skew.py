"""Recompute served features point-in-time and compare: the feature-store side of the skew check.

The API logs the user features it served in every impression (``Impression.features``). For a
batch of such rows, :func:`recompute` asks the training path for the same (user, request time):
``features.history.historical_features`` through the same ``FeatureService``
(``recommender_user_v1``), i.e. Feast's point-in-time semantics over the registry's views, as
the trainer's data set reads them (``online_trainer/dataset.py``). Both sides are normalized to
model inputs (``features.skew_stats.model_row``) and compared by ``skew_stats.skew``.

Drift: :func:`reference_sample` draws up to ``n`` rows of the ``user_activity`` offline log up to
a cut (the states the bootstrap model learned from) and joins the service's features at those
times, the same path again; ``skew_stats.drift`` compares it with the recent served rows.

Cost: every join reads the stream views' offline logs whole (as the trainer's does); compacting
them (``streamrec features compact``) keeps that to a few files. See docs/design/skew.md.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import pandas as pd
from feast import FeatureStore
from feast.errors import FeastObjectNotFoundException

from features import skew_stats, views
from features.errors import FeaturesError
from features.history import historical_features, read_source
from features.store import data_dir_of
from streamrec.core import contracts
from streamrec.core.attributes import InputKind, read_schema, user_model_inputs


@dataclass(frozen=True)
class ServedRow:
    """One request's served user features, as the impression logged them."""

    user_id: str
    request_time: datetime  # tz-aware: when the API answered
    features: Mapping[str, Any]


def model_inputs(store: FeatureStore, service_name: str = contracts.USER_FEATURE_SERVICE) -> dict[str, InputKind]:
    """The model's user inputs (``user_model_inputs`` of the stored schema), checked against the service."""
    inputs = user_model_inputs(read_schema(data_dir_of(store)))
    try:
        service = store.get_feature_service(service_name)
    except FeastObjectNotFoundException as exc:
        raise FeaturesError(
            f"the feature store in {data_dir_of(store)} (project {store.project!r}) has no FeatureService "
            f"{service_name!r}; run `streamrec features setup` with this process's settings first"
        ) from exc
    offered = {feature.name for projection in service.feature_view_projections for feature in projection.features}
    missing = sorted(set(inputs) - offered - {contracts.USER_JOIN_KEY})
    if missing:
        raise FeaturesError(
            f"FeatureService {service_name!r} lacks {missing}, which the attribute schema says the model reads; "
            "run `streamrec features setup` to register the current feature definitions"
        )
    return inputs


def _joined_rows(
    store: FeatureStore,
    user_ids: Sequence[str],
    times: pd.Series,
    inputs: Mapping[str, InputKind],
    service: str,
    max_age: timedelta | None = None,
) -> list[dict[str, Any]]:
    entity_df = pd.DataFrame(
        {contracts.USER_JOIN_KEY: [str(user_id) for user_id in user_ids], views.EVENT_TIMESTAMP: times}
    )
    joined = historical_features(store, entity_df, service, max_age=max_age)  # one row per entity row, in order
    records = joined.to_dict("records")
    return [skew_stats.model_row({str(key): value for key, value in record.items()}, inputs) for record in records]


def recompute(
    store: FeatureStore,
    rows: Sequence[ServedRow],
    inputs: Mapping[str, InputKind],
    service_name: str = contracts.USER_FEATURE_SERVICE,
    max_age: timedelta | None = None,
) -> list[dict[str, Any]]:
    """The service's features of each row's user as of its request time, normalized, in order;
    ``max_age``: serving's age rule (``features.max_feature_age_s``) in place of the views' TTL."""
    if not rows:
        return []
    times = pd.Series(pd.to_datetime([row.request_time for row in rows], utc=True)).astype("datetime64[ns, UTC]")
    return _joined_rows(store, [row.user_id for row in rows], times, inputs, service_name, max_age)


def served_rows(rows: Sequence[ServedRow], inputs: Mapping[str, InputKind]) -> list[dict[str, Any]]:
    """What each request served, normalized as the model reads it."""
    return [skew_stats.model_row(row.features, inputs) for row in rows]


def reference_sample(
    store: FeatureStore,
    inputs: Mapping[str, InputKind],
    *,
    until: datetime,
    n: int,
    seed: int = 0,
    service_name: str = contracts.USER_FEATURE_SERVICE,
) -> list[dict[str, Any]]:
    """Up to ``n`` rows of the service's features at the times of logged ``user_activity`` states
    up to ``until`` (uniformly sampled), normalized; empty when nothing was logged by then."""
    view = store.get_feature_view(contracts.USER_ACTIVITY_VIEW)
    states = read_source(store, view, [contracts.USER_JOIN_KEY, views.EVENT_TIMESTAMP])
    states = states.loc[states[views.EVENT_TIMESTAMP] <= pd.Timestamp(until).tz_convert("UTC")]
    if len(states) > n:
        states = states.iloc[sorted(random.Random(seed).sample(range(len(states)), n))]  # noqa: S311 -- a sample
    if states.empty:
        return []
    return _joined_rows(
        store,
        states[contracts.USER_JOIN_KEY].astype(str).tolist(),
        states[views.EVENT_TIMESTAMP].reset_index(drop=True),
        inputs,
        service_name,
    )


@dataclass(frozen=True)
class SkewReport:
    """One check: rows compared, the skew per feature, and the drift per feature (None without a reference)."""

    rows: int
    skew: list[skew_stats.FeatureStatistics]
    drift: list[skew_stats.FeatureStatistics] | None


def check(
    store: FeatureStore,
    rows: Sequence[ServedRow],
    inputs: Mapping[str, InputKind],
    reference: Sequence[Mapping[str, Any]],
    *,
    bins: int = 20,
    rel_tol: float = 1e-6,
    abs_tol: float = 1e-9,
    max_age: timedelta | None = None,
) -> SkewReport:
    """Recompute ``rows`` and compare them with what was served; drift against ``reference`` if any."""
    served = served_rows(rows, inputs)
    recomputed = recompute(store, rows, inputs, max_age=max_age)
    skew = skew_stats.skew(served, recomputed, inputs, bins=bins, rel_tol=rel_tol, abs_tol=abs_tol)
    drift = skew_stats.drift(reference, served, inputs, bins=bins) if reference else None
    return SkewReport(len(rows), skew, drift)
