"""The dataset loader: presets, description files, and one clear message per bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from streamrec.core.errors import DatasetError
from streamrec.datasets import movielens, shop
from streamrec.datasets.description import load_dataset

EVENTS = (
    "ts,who,what,action\n"
    "1700000000000,u-a,i-1,view\n1700000001000,u-b,i-2,addtocart\n1700000002000,u-a,i-2,transaction\n"
)
ITEMS = "sku,cat,price,tags\ni-1,shoes,10.5,red|sale\ni-2,hats,3,blue\n"
DESCRIPTION = """
name = "tiny"
[interactions]
path = "events.csv"
user = "who"
item = "what"
timestamp = "ts"
time_unit = "ms"
kind = "action"
[kinds]
addtocart = "add_to_cart"
transaction = "purchase"
[items]
path = "items.csv"
id = "sku"
attributes = [
  { name = "category", type = "categorical", column = "cat" },
  { name = "price", type = "numeric", boundaries = [5.0] },
  { name = "tags", type = "multi_categorical" },
]
"""


def write(folder: Path, *, events: str = EVENTS, items: str = ITEMS, description: str = DESCRIPTION) -> Path:
    (folder / "events.csv").write_text(events)
    (folder / "items.csv").write_text(items)
    path = folder / "tiny.toml"
    path.write_text(description)
    return path


def test_movielens_preset_gives_todays_frames() -> None:
    dataset = load_dataset("ml-100k")
    pd.testing.assert_frame_equal(dataset.interactions, movielens.load_interactions())
    users = movielens.load_users()
    assert dataset.users is not None and dataset.items is not None
    assert dataset.users["user_id"].tolist() == users["user_id"].tolist()
    assert dataset.users["age"].tolist() == users["age"].astype(float).tolist()
    assert dataset.users["zip_prefix"].tolist() == users["zip_code"].str[:3].tolist()
    items = movielens.load_items()
    assert dataset.items["genres"].tolist() == items["genres"].tolist()
    assert dataset.items["release_year"].isna().sum() == items["release_year"].isna().sum()
    assert [a.name for a in dataset.schema.user] == ["age", "gender", "occupation", "zip_prefix"]
    assert dataset.schema.event_kinds == ("rating",)


def test_description_file_maps_columns_kinds_and_attributes(tmp_path: Path) -> None:
    dataset = load_dataset(str(write(tmp_path)))
    assert dataset.name == "tiny"
    assert dataset.interactions["kind"].tolist() == ["view", "add_to_cart", "purchase"]
    assert dataset.interactions["event_time"].iloc[0] == pd.Timestamp("2023-11-14T22:13:20Z")
    assert dataset.items is not None and dataset.users is None
    assert dataset.items["category"].tolist() == ["shoes", "hats"]
    assert dataset.items["tags"].tolist() == [["red", "sale"], ["blue"]]
    assert dataset.items["price"].tolist() == [10.5, 3.0]
    assert dataset.schema.event_kinds == ("add_to_cart", "purchase", "view")
    assert dataset.schema.counted_kinds == ("add_to_cart", "purchase", "view")
    assert "3 interactions, 2 users" in dataset.summary()
    assert "item attributes: category (categorical), price (numeric), tags (multi_categorical)" in dataset.summary()


def test_numeric_attribute_without_boundaries_gets_data_quantiles(tmp_path: Path) -> None:
    items = "sku,cat,price,tags\n" + "".join(f"i-{n},c,{n},t\n" for n in range(1, 101))
    dataset = load_dataset(
        str(write(tmp_path, items=items, description=DESCRIPTION.replace(", boundaries = [5.0]", "")))
    )
    (price,) = [a for a in dataset.schema.item if a.name == "price"]
    assert len(price.boundaries) == 9 and price.boundaries[0] == pytest.approx(10.9)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"description": DESCRIPTION.replace('user = "who"', 'user = "visitor"')},
            r"column\(s\) \['visitor'\] not found",
        ),
        ({"events": EVENTS.replace("1700000001000", "yesterday")}, "cannot parse timestamps"),
        ({"events": EVENTS.replace("u-b", "")}, "empty user or item id"),
        ({"events": "ts,who,what,action\n"}, "no rows"),
        ({"items": ITEMS + "i-1,shoes,11,x\n"}, "'i-1' appears 2 times"),
        ({"events": EVENTS.replace("addtocart", "wishlist")}, r"kind\(s\) \['wishlist'\].*\[kinds\]"),
        ({"items": ITEMS.replace("10.5", "cheap")}, "not numbers"),
        (
            {"description": DESCRIPTION.replace('name = "tiny"', 'name = "tiny"\ncolour = "red"')},
            "colour: Extra inputs",
        ),
        ({"description": DESCRIPTION.replace('name = "price"', 'name = "count_1h"')}, "reserved"),
        ({"description": DESCRIPTION.replace('path = "items.csv"', 'path = "nope.csv"')}, "nope.csv does not exist"),
    ],
)
def test_each_bad_input_stops_with_one_message(tmp_path: Path, change: dict[str, str], message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        load_dataset(str(write(tmp_path, **change)))


def test_unknown_spec_names_the_choices() -> None:
    with pytest.raises(DatasetError, match="neither a preset"):
        load_dataset("no-such-dataset")


def test_bare_log_with_columns_has_no_attributes(tmp_path: Path) -> None:
    write(tmp_path)
    dataset = load_dataset(str(tmp_path / "events.csv"), columns="user=who,item=what,timestamp=ts,rating=,time_unit=ms")
    assert dataset.users is None and dataset.items is None
    assert dataset.schema.user == dataset.schema.item == ()
    assert dataset.item_ids == ["i-1", "i-2"]


def test_synthetic_shop_files_and_preset_agree(tmp_path: Path) -> None:
    shape = "events=3000,items=200,users=100"
    preset = load_dataset(f"synthetic:{shape}")
    written = load_dataset(
        str(shop.write_shop(tmp_path, shop.ShopShape(n_events=3000, n_items=200, n_users=100), name="synthetic"))
    )
    pd.testing.assert_frame_equal(
        preset.interactions.drop(columns="event_id"), written.interactions.drop(columns="event_id")
    )
    assert preset.items is not None and written.items is not None
    pd.testing.assert_frame_equal(preset.items, written.items, check_exact=False)
    assert set(preset.interactions["kind"]) == {"view", "add_to_cart", "purchase"}
    assert preset.interactions["user_id"].str.fullmatch(r"[0-9a-f-]{36}").all()
    assert np.isfinite(preset.items["price"]).all()
    with pytest.raises(DatasetError, match="synthetic option"):
        load_dataset("synthetic:colours=3")
