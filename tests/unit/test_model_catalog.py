"""The catalog and the point-in-time example frame the model trains on."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from online_trainer.catalog import EXAMPLE_COLUMNS, ItemCatalog, examples_from_interactions
from online_trainer.ranking_metrics import ranking_metrics, top_k_masked
from streamrec.core.errors import DatasetError


def _events(rows: list[tuple[str, str, int]]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "event_id": [f"e{n}" for n in range(len(rows))],
            "user_id": [user for user, _, _ in rows],
            "item_id": [item for _, item, _ in rows],
            "event_time": pd.to_datetime([seconds for _, _, seconds in rows], unit="s", utc=True),
        }
    )


def test_examples_see_only_earlier_events_with_contract_windows() -> None:
    events = _events([("u", "i1", 0), ("u", "i2", 1800), ("v", "i9", 1900), ("u", "i1", 7200), ("u", "i3", 90000)])
    users = pd.DataFrame(
        {"user_id": ["u"], "age": [30], "gender": ["F"], "occupation": ["writer"], "zip_code": ["02139"]}
    )
    frame = examples_from_interactions(events, users)
    assert list(frame.columns) == list(EXAMPLE_COLUMNS)
    u = frame[frame["user_id"] == "u"].reset_index(drop=True)
    assert u["item_id"].tolist() == ["i1", "i2", "i1", "i3"]
    # recent items: distinct, newest first, from events before this one only
    assert u["recent_items"].tolist() == [[], ["i1"], ["i2", "i1"], ["i1", "i2"]]
    # counts as of the previous event t_prev, window (t_prev - W, t_prev]
    assert u["count_1h"].tolist() == [0, 1, 2, 1]
    assert u["count_24h"].tolist() == [0, 1, 2, 3]
    assert u.loc[0, ["age_bucket", "gender", "occupation", "zip_prefix"]].tolist() == ["25-34", "F", "writer", "021"]
    v = frame[frame["user_id"] == "v"].iloc[0]
    assert (v["age_bucket"], v["recent_items"], v["count_24h"]) == ("", [], 0)


def test_recent_items_are_capped() -> None:
    events = _events([("u", f"i{n}", n) for n in range(30)])
    last = examples_from_interactions(events, None).iloc[-1]
    assert last["recent_items"] == [f"i{n}" for n in range(28, 8, -1)]


def test_catalog_grows_and_rejects_bad_input() -> None:
    catalog = ItemCatalog(("1", "2"), (("Drama",), ()), (1999, -1))
    grown = catalog.with_new_items(["2", "3"], [["Comedy"], "Action Drama"], [2000, 2001])
    assert grown.item_ids == ("1", "2", "3") and grown.genres[2] == ("Action", "Drama")
    assert catalog.with_new_items(["1"], [[]], [1]) is catalog
    assert ItemCatalog.from_json(grown.to_json()) == grown
    with pytest.raises(DatasetError, match="appears twice"):
        ItemCatalog(("1", "1"), ((), ()), (1, 1))
    frame = pd.DataFrame({"item_id": ["7"], "genres": [["Horror"]], "release_year": [pd.NA]})
    assert ItemCatalog.from_frame(frame).release_year == (-1,)


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


@pytest.mark.parametrize(
    ("field", "before"), [("use_last_item", False), ("last_items", 1), ("use_position_weights", False)]
)
def test_a_model_config_saved_before_a_newer_input_restores_as_it_was_built(field: str, before: object) -> None:
    from online_trainer.model_config import ModelConfig

    saved = ModelConfig().to_json()
    assert getattr(ModelConfig.from_json(saved), field) == getattr(ModelConfig(), field) != before
    del saved[field]
    assert getattr(ModelConfig.from_json(saved), field) == before


def test_position_weights_start_as_the_plain_mean_of_the_recent_items() -> None:
    """Zero slot logits: a new model's user tower equals one built without position weights."""
    import tensorflow as tf

    from online_trainer.catalog import ItemCatalog
    from online_trainer.model import build_model
    from online_trainer.model_config import ModelConfig

    items = pd.DataFrame({"item_id": ["a", "b", "c"], "genres": [["x"], ["y"], []], "release_year": [1990, 1995, -1]})
    catalog = ItemCatalog.from_frame(items)
    weighted = build_model(catalog, ModelConfig(use_position_weights=True))
    plain = build_model(catalog, ModelConfig(use_position_weights=False))
    recent = tf.constant([["a", "b", "", ""], ["", "", "", ""]])
    assert np.allclose(weighted._recent_items(recent), plain._recent_items(recent))
    assert np.allclose(weighted._recent_items(recent)[1], 0.0)  # no recent items: zeros, as the plain mean
