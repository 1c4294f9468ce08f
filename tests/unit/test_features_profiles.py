"""Profile rows from attribute frames, their files, and the stamp of the dataset a store holds."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from features import profiles, views
from features.errors import FeaturesError
from streamrec.core.attributes import Attribute, AttributeSchema

SCHEMA = AttributeSchema(
    user=(Attribute(name="segment", type="categorical"),),
    item=(
        Attribute(name="category", type="categorical"),
        Attribute(name="tags", type="multi_categorical"),
        Attribute(name="price", type="numeric", boundaries=(5.0,)),
    ),
    event_kinds=("purchase", "view"),
)
USERS = pd.DataFrame({"user_id": ["1", "2"], "segment": ["new", ""]})
ITEMS = pd.DataFrame(
    {"item_id": ["1", "2"], "category": ["hats", ""], "tags": [["red", "sale"], []], "price": [3.5, float("nan")]}
)


def test_rows_hold_the_declared_columns_at_the_profile_time() -> None:
    tables = profiles.profile_tables(SCHEMA, USERS, ITEMS.assign(unused=1))
    assert set(tables) == {"user_profile", "item_profile"}
    items = tables["item_profile"].to_pandas()
    assert list(items.columns) == ["item_id", "category", "tags", "price", views.EVENT_TIMESTAMP]
    assert [list(tags) for tags in items["tags"]] == [["red", "sale"], []]
    assert items["price"].iloc[0] == 3.5 and math.isnan(items["price"].iloc[1])
    assert (items[views.EVENT_TIMESTAMP] == pd.Timestamp(profiles.PROFILE_TIMESTAMP)).all()
    assert tables["user_profile"].schema == views.profile_arrow_schema(SCHEMA, "user")


def test_a_side_without_attributes_has_no_rows_even_when_a_frame_is_given() -> None:
    tables = profiles.profile_tables(SCHEMA.model_copy(update={"user": ()}), USERS, ITEMS)
    assert set(tables) == {"item_profile"}
    assert profiles.profile_tables(AttributeSchema(), None, None) == {}


@pytest.mark.parametrize(
    ("users", "items", "message"),
    [
        (None, ITEMS, r"declares user attributes \['segment'\] but no user frame"),
        (USERS.drop(columns="segment"), ITEMS, r"lacks the column\(s\) \['segment'\]"),
        (USERS, ITEMS.rename(columns={"item_id": "sku"}), r"lacks the column\(s\) \['item_id'\]"),
        (pd.concat([USERS, USERS.iloc[:1]]), ITEMS, "user_id '1' more than once"),
        (USERS, ITEMS.assign(price=["cheap", "dear"]), "does not match its declared attributes"),
    ],
)
def test_frames_that_do_not_match_the_schema_are_refused(
    users: pd.DataFrame | None, items: pd.DataFrame, message: str
) -> None:
    with pytest.raises(FeaturesError, match=message):
        profiles.profile_tables(SCHEMA, users, items)


def test_writing_removes_the_file_of_a_view_the_new_dataset_lacks(tmp_path: Path) -> None:
    assert profiles.write_profiles(tmp_path, profiles.profile_tables(SCHEMA, USERS, ITEMS)) == {
        "user_profile": 2,
        "item_profile": 2,
    }
    assert pq.read_table(views.profile_path(tmp_path, "user_profile")).num_rows == 2
    items_only = profiles.profile_tables(SCHEMA.model_copy(update={"user": ()}), None, ITEMS)
    assert profiles.write_profiles(tmp_path, items_only) == {"item_profile": 2}
    assert not views.profile_path(tmp_path, "user_profile").exists()
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, nothing left behind


def test_the_stamp_round_trips_and_an_unreadable_one_counts_as_none(tmp_path: Path) -> None:
    assert profiles.read_stamp(tmp_path) is None
    stamp = profiles.DatasetStamp("shop", SCHEMA)
    profiles.write_stamp(tmp_path, stamp)
    assert profiles.read_stamp(tmp_path) == stamp
    assert profiles.read_stamp(tmp_path) != profiles.DatasetStamp("shop", SCHEMA.model_copy(update={"item": ()}))
    (tmp_path / profiles.STAMP_FILE).write_text("{not json")
    assert profiles.read_stamp(tmp_path) is None
    profiles.clear_stamp(tmp_path)
    profiles.clear_stamp(tmp_path)  # already gone: fine
    assert not (tmp_path / profiles.STAMP_FILE).exists()
