"""The catalog and the point-in-time example frame the model trains on, for any declared schema."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from online_trainer.catalog import ItemCatalog, item_arrays
from online_trainer.examples import example_columns, examples_from_interactions, user_arrays
from online_trainer.ranking_metrics import ranking_metrics, top_k_masked
from streamrec.core.attributes import Attribute, AttributeSchema
from streamrec.core.errors import DatasetError

USER_SCHEMA = AttributeSchema(
    user=(
        Attribute(name="plan", type="categorical"),
        Attribute(name="visits", type="numeric", boundaries=(1.0, 10.0)),
        Attribute(name="devices", type="multi_categorical", max_tokens=2),
    )
)
ITEM_SCHEMA = AttributeSchema(
    item=(
        Attribute(name="brand", type="categorical"),
        Attribute(name="weight_g", type="numeric", boundaries=(100.0,)),
        Attribute(name="colors", type="multi_categorical", separator=";", max_tokens=2),
    )
)


def _events(rows: list[tuple[str, str, int]], kinds: list[str] | None = None) -> pd.DataFrame:
    frame = pd.DataFrame(
        {
            "event_id": [f"e{n}" for n in range(len(rows))],
            "user_id": [user for user, _, _ in rows],
            "item_id": [item for _, item, _ in rows],
            "event_time": pd.to_datetime([seconds for _, _, seconds in rows], unit="s", utc=True),
        }
    )
    if kinds is not None:
        frame["kind"] = kinds
    return frame


def test_examples_see_only_earlier_events_with_contract_windows() -> None:
    events = _events([("u", "i1", 0), ("u", "i2", 1800), ("v", "i9", 1900), ("u", "i1", 7200), ("u", "i3", 90000)])
    users = pd.DataFrame({"user_id": ["u"], "plan": ["pro"], "visits": [3.0], "devices": [["phone", "tv"]]})
    frame = examples_from_interactions(events, users, USER_SCHEMA)
    assert list(frame.columns) == list(example_columns(USER_SCHEMA))
    assert list(frame.columns)[-6:] == ["plan", "visits", "devices", "item_id", "kind", "event_time"]
    u = frame[frame["user_id"] == "u"].reset_index(drop=True)
    assert u["item_id"].tolist() == ["i1", "i2", "i1", "i3"]
    # recent items: distinct, newest first, from events before this one only
    assert u["recent_items"].tolist() == [[], ["i1"], ["i2", "i1"], ["i1", "i2"]]
    # counts as of the previous event t_prev, window (t_prev - W, t_prev]
    assert u["count_1h"].tolist() == [0, 1, 2, 1]
    assert u["count_24h"].tolist() == [0, 1, 2, 3]
    assert (u.loc[0, "plan"], u.loc[0, "visits"], u.loc[0, "devices"]) == ("pro", 3.0, ["phone", "tv"])
    v = frame[frame["user_id"] == "v"].iloc[0]  # no row in the users frame: every attribute unknown
    assert (v["plan"], v["devices"], v["recent_items"], v["count_24h"]) == ("", [], [], 0)
    assert math.isnan(v["visits"])


def test_per_kind_counts_follow_the_window_semantics() -> None:
    schema = AttributeSchema(event_kinds=("purchase", "view"))
    rows = [("u", "a", 0), ("u", "b", 600), ("u", "c", 4000), ("u", "d", 4300), ("u", "e", 90000)]
    frame = examples_from_interactions(_events(rows, ["view", "purchase", "purchase", "view", "view"]), None, schema)
    # as of the previous event t_prev, (t_prev - W, t_prev]: at d, t_prev = 4000 holds b (600 is
    # outside 1 h: 4000 - 3600 = 400 < 600) and c; at e, t_prev = 4300 and 1 h holds c, d
    assert frame["count_1h"].tolist() == [0, 1, 2, 2, 2]
    assert frame["purchase_count_1h"].tolist() == [0, 0, 1, 2, 1]
    assert frame["view_count_1h"].tolist() == [0, 1, 1, 0, 1]
    assert frame["purchase_count_24h"].tolist() == [0, 0, 1, 2, 2]
    assert frame["view_count_24h"].tolist() == [0, 1, 1, 1, 2]
    assert frame["kind"].tolist() == ["view", "purchase", "purchase", "view", "view"]
    with pytest.raises(DatasetError, match="no `kind` column"):
        examples_from_interactions(_events(rows), None, schema)


def test_recent_items_are_capped() -> None:
    events = _events([("u", f"i{n}", n) for n in range(30)])
    last = examples_from_interactions(events, None).iloc[-1]
    assert last["recent_items"] == [f"i{n}" for n in range(28, 8, -1)]


def test_user_arrays_take_each_attribute_as_its_input_kind() -> None:
    frame = pd.DataFrame(
        {"user_id": ["a", "b"], "plan": ["pro", None], "visits": [2, None], "devices": [["x", "y", "z"], None]}
    )
    arrays = user_arrays(frame, USER_SCHEMA)
    assert arrays["plan"].tolist() == ["pro", ""]
    assert arrays["visits"].dtype == np.float32 and arrays["visits"][0] == 2.0 and np.isnan(arrays["visits"][1])
    assert arrays["devices"].tolist() == [["x", "y"], ["", ""]]  # max_tokens columns, "" padded
    assert arrays["recent_items"].shape == (2, 20) and arrays["count_24h"].tolist() == [0, 0]


def test_catalog_grows_and_rejects_bad_input() -> None:
    items = pd.DataFrame(
        {"item_id": ["1", "2"], "brand": ["acme", None], "weight_g": [50, np.nan], "colors": ["red;blue", []]}
    )
    catalog = ItemCatalog.from_frame(items, ITEM_SCHEMA)
    assert catalog.values["colors"] == (("red", "blue"), ()) and catalog.values["brand"] == ("acme", "")
    grown = catalog.with_new_items(["2", "3"], [{"brand": "other"}, {"brand": "zed", "colors": ["green"]}])
    assert grown.item_ids == ("1", "2", "3") and grown.attribute_row("3")["colors"] == ("green",)
    assert grown.attribute_row("2")["brand"] == ""  # first wins
    assert math.isnan(grown.attribute_row("3")["weight_g"])  # not given: unknown
    assert catalog.with_new_items(["1"]) is catalog
    assert ItemCatalog.from_json(grown.to_json()) == grown  # NaN survives the round trip
    ids, values = item_arrays(grown, np.array(["3", "nope"], dtype=object))
    assert values["colors"].tolist() == [["green", ""], ["", ""]] and values["brand"].tolist() == ["zed", ""]
    with pytest.raises(DatasetError, match="appears twice"):
        ItemCatalog(("1", "1"))
    with pytest.raises(DatasetError, match=r"missing column\(s\) \['weight_g', 'colors'\]"):
        ItemCatalog.from_frame(items[["item_id", "brand"]], ITEM_SCHEMA)


def test_a_catalog_without_attribute_file_is_the_items_seen() -> None:
    catalog = ItemCatalog.for_dataset(None, ["b", "a", "b", "c"], ITEM_SCHEMA)
    assert catalog.item_ids == ("b", "a", "c") and catalog.values["brand"] == ("", "", "")
    items = pd.DataFrame({"item_id": ["a"], "brand": ["acme"], "weight_g": [1.0], "colors": [["red"]]})
    mixed = ItemCatalog.for_dataset(items, ["b", "a"], ITEM_SCHEMA)
    assert mixed.item_ids == ("a", "b") and mixed.values["brand"] == ("acme", "")
    assert ItemCatalog.for_dataset(None, ["x"], AttributeSchema()).to_json() == {
        "item_ids": ["x"],
        "attributes": [],
        "values": {},
    }


def test_ranking_metrics_match_recbole_definitions() -> None:
    result = ranking_metrics([["a", "b", "c"], ["a", "b", "c"], ["z", "y", "x"]], [{"b", "d"}, {"x"}, set()], k=3)
    # user 1: recall 1/2, NDCG (1/log2 3) / (1 + 1/log2 3); user 2: nothing found; user 3 has no test items
    ndcg_1 = (1 / 1.5849625007) / (1 + 1 / 1.5849625007)
    assert result.users == 2
    assert result.recall == pytest.approx(0.25)
    assert result.ndcg == pytest.approx(ndcg_1 / 2)
    assert result.hit == pytest.approx(0.5)


def test_top_k_masked_skips_seen_items() -> None:
    import numpy as np

    scores = np.array([[0.9, 0.8, 0.1, 0.5]])
    mask = np.array([[True, False, False, False]])
    assert top_k_masked(scores, mask, 2).tolist() == [[1, 3]]


def test_recbole_split_follows_recboles_rounding() -> None:
    from bench.offline_quality import recbole_random_split, recbole_split_sizes

    assert recbole_split_sizes(100) == [80, 10, 10]
    assert recbole_split_sizes(25) == [21, 2, 2]
    assert recbole_split_sizes(5) == [3, 1, 1]  # a ratio that rounds to 0 still gets one interaction
    events = _events([(f"u{n % 3}", f"i{n}", n) for n in range(60)])
    train_rows, valid_rows, test_rows = recbole_random_split(events, seed=1)
    assert (len(train_rows), len(valid_rows), len(test_rows)) == (48, 6, 6)
    assert set(valid_rows["user_id"]) == set(test_rows["user_id"]) == {"u0", "u1", "u2"}
    ids = [set(frame["event_id"]) for frame in (train_rows, valid_rows, test_rows)]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])


def test_a_model_config_round_trips_with_its_schema_and_an_older_one_is_refused() -> None:
    import json

    from online_trainer.model_config import ModelConfig

    config = ModelConfig(attributes=USER_SCHEMA)
    assert ModelConfig.from_json(json.loads(json.dumps(config.to_json()))) == config
    saved = config.to_json()
    del saved["attributes"]  # as issue 19's versions saved it
    with pytest.raises(DatasetError, match="retrain with `streamrec train"):
        ModelConfig.from_json(saved)


def test_position_weights_start_as_the_plain_mean_of_the_recent_items() -> None:
    """Zero slot logits: a new model's user tower equals one built without position weights."""
    import tensorflow as tf

    from online_trainer.catalog import ItemCatalog
    from online_trainer.model import build_model
    from online_trainer.model_config import ModelConfig

    catalog = ItemCatalog.from_items_seen(["a", "b", "c"], AttributeSchema())
    weighted = build_model(catalog, ModelConfig(use_position_weights=True))
    plain = build_model(catalog, ModelConfig(use_position_weights=False))
    recent = tf.constant([["a", "b", "", ""], ["", "", "", ""]])
    assert np.allclose(weighted._recent_items(recent), plain._recent_items(recent))
    assert np.allclose(weighted._recent_items(recent)[1], 0.0)  # no recent items: zeros, as the plain mean


def test_the_quality_benchmarks_set_up_any_dataset() -> None:
    """bench.offline_quality and bench.prequential on a small synthetic shop (string ids, three
    kinds, item attributes, no user file): catalog, users, examples and one evaluation."""
    from bench import offline_quality, prequential
    from online_trainer.model import build_model
    from online_trainer.model_config import ModelConfig
    from online_trainer.settings import TrainerTuning
    from streamrec.datasets.description import load_dataset

    dataset = load_dataset("synthetic:users=60,items=80,events=1500,categories=5")
    setup = offline_quality.prepare(dataset, seed=1)
    assert len(setup.catalog) == 80 and setup.catalog.attributes == dataset.schema.item
    assert setup.users.columns.tolist() == ["user_id"] and len(setup.users) == dataset.interactions["user_id"].nunique()
    assert len(setup.examples) == len(setup.train_rows)
    model = build_model(setup.catalog, ModelConfig(attributes=setup.schema, embedding_dim=8, item_id_buckets=256))
    evaluator = offline_quality.Evaluator(setup.catalog, setup.users, setup.train_rows, setup.valid_rows)
    metrics = evaluator.evaluate(evaluator.model_scores(model))
    assert 0.0 <= metrics.recall <= 1.0 and metrics.users > 0

    tuning = TrainerTuning(positive_kinds=("add_to_cart", "purchase"))
    catalog, examples = prequential.prepare(dataset, tuning)
    assert catalog == setup.catalog
    assert set(examples["kind"]) == {"add_to_cart", "purchase"} and examples["event_time"].is_monotonic_increasing
    assert examples["view_count_24h"].max() > 0  # views are not learned, but they are counted
