"""Names and shapes shared by features, streams, trainer and serving.

Each part of the system is built separately; these constants are the handshake between them.
Change a name here and every side follows; change a *meaning* and bump the version suffix.

Features (Feast, ``features/``)
===============================
Entities: ``user`` (join key ``user_id``, string) and ``item`` (join key ``item_id``, string).

Batch feature views, generated from the dataset's declared attributes
(``streamrec.core.attributes``; parquet written by ``streamrec features setup``, materialized):
  * ``user_profile`` / ``item_profile``: one feature per declared attribute (String,
    Array(String) or Float64); a side without attributes has no profile view.

Stream feature views (Feast ``PushSource``, written by the Faust worker, ``streams/``):
  * ``user_activity`` (push source ``user_activity_push``): ``recent_items`` (list[str], newest
    first, at most ``RECENT_ITEMS_MAX`` distinct ids), ``count_1h``, ``count_24h`` (int64),
    ``last_event_ts`` (int64, epoch seconds)
  * ``item_stats`` (push source ``item_stats_push``): ``count_1h``, ``count_24h`` (int64),
    ``trending_score`` (float64)
  * both, when the dataset has several event kinds: ``<kind>_count_1h``, ``<kind>_count_24h``
    (int64) per kind (``attributes.kind_count_features``), the same windows over that kind's events

Window semantics (event time, exact, what the tests compare against a pandas reference): for an
entity whose latest accepted event has time ``t``, ``count_W`` is the number of distinct
``event_id``s of that entity with event time in ``(t - W, t]``. ``trending_score`` is
``count_1h / (1 + count_24h / 24)``: the last hour against the entity's average hour of the day.

Feature services: ``USER_FEATURE_SERVICE`` lists what the model's user tower reads (one row per
request at serving); ``ITEM_FEATURE_SERVICE`` what its item tower reads (the whole catalog,
loaded into the model at export, and refreshed by the API in memory).

Model (SavedModel, ``online_trainer/`` exports, ``serving/`` serves)
===================================================================
One model name, ``MODEL_NAME``, with three signatures besides ``serving_default`` (= recommend).
The user inputs follow the dataset's attribute schema: exactly
``streamrec.core.attributes.user_model_inputs(schema)`` (``user_id`` string [B]; ``recent_items``
string [B, RECENT_ITEMS_MAX] padded with ""; ``count_1h``, ``count_24h`` and each counted kind's
counts int64 [B]; one input per user attribute, named as the attribute: string [B] ("" unknown),
string [B, M] "" padded, or float32 [B] (NaN unknown)).

``recommend`` inputs (batch dimension B): the user inputs plus ``exclude_items`` string [B, E]
  padded with "" (any E >= 1).
``recommend`` outputs: ``item_ids`` string [B, TOP_K_EXPORTED], ``scores`` float32 [B, TOP_K_EXPORTED],
  best first, never containing an excluded id.
``score`` inputs: the user inputs plus ``item_ids`` string [B, N]; output ``scores`` float32 [B, N].
``similar`` (``SIMILAR_SIGNATURE``) inputs: ``item_id`` string [B], ``exclude_items`` string [B, E];
  outputs ``item_ids`` string [B, TOP_K_EXPORTED] and ``scores`` float32 [B, TOP_K_EXPORTED]: the
  cosine of the catalog's item-tower vectors / temperature, best first, never the item itself nor
  an excluded id; an item not in the catalog gets all ids "" and scores float32 min (the padding score).

Version labels: ``stable`` and ``canary`` (TF Serving's ``version_labels``).

Ranking model (``RANKER_MODEL_NAME``, its own version line and labels on the same model server)
=============================================================================================
``rank`` (``RANK_SIGNATURE``, also ``serving_default``) inputs: the user inputs (as above) plus
``item_ids`` string [B, N] (retrieved candidates, "" padded) and ``retrieval_scores`` float32
[B, N] (the retrieval model's scores of those candidates minus the best candidate's, so <= 0;
the impression logs the same values); output ``scores`` float32 [B, N]: the
logit of a click at the top position, higher is better (padding gets float32 min). The position a
logged item was shown at is a training-only input (it debiases the labels) and is not an input here.
"""

from __future__ import annotations

from typing import Final

# -- features ------------------------------------------------------------------------------
USER_ENTITY: Final = "user"
ITEM_ENTITY: Final = "item"
USER_JOIN_KEY: Final = "user_id"
ITEM_JOIN_KEY: Final = "item_id"

USER_PROFILE_VIEW: Final = "user_profile"
ITEM_PROFILE_VIEW: Final = "item_profile"
USER_ACTIVITY_VIEW: Final = "user_activity"
ITEM_STATS_VIEW: Final = "item_stats"
USER_ACTIVITY_PUSH: Final = "user_activity_push"
ITEM_STATS_PUSH: Final = "item_stats_push"

USER_ACTIVITY_FEATURES: Final = ("recent_items", "count_1h", "count_24h", "last_event_ts")
ITEM_STATS_FEATURES: Final = ("count_1h", "count_24h", "trending_score")

USER_FEATURE_SERVICE: Final = "recommender_user_v1"
ITEM_FEATURE_SERVICE: Final = "recommender_item_v1"

RECENT_ITEMS_MAX: Final = 20
WINDOWS_S: Final = {"count_1h": 3600, "count_24h": 24 * 3600}

# -- model ---------------------------------------------------------------------------------
MODEL_NAME: Final = "streamrec"
RECOMMEND_SIGNATURE: Final = "recommend"
SCORE_SIGNATURE: Final = "score"
SIMILAR_SIGNATURE: Final = "similar"
TOP_K_EXPORTED: Final = 100
RANKER_MODEL_NAME: Final = "streamrec_ranker"
RANK_SIGNATURE: Final = "rank"
STABLE_LABEL: Final = "stable"
CANARY_LABEL: Final = "canary"
# A version's lineage (data range, Kafka offsets, parent, gate figures), inside ``<base>/<version>/``;
# ``lineage["freshness"]["produced_counts"]``: [[epoch second, records]] it newly learned.
LINEAGE_PATH: Final = "assets.extra/lineage.json"


def trending_score(count_1h: int, count_24h: int) -> float:
    return count_1h / (1.0 + count_24h / 24.0)
