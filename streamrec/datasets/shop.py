"""A synthetic shop: a click stream that looks nothing like MovieLens, with structure to learn.

The layout is a retail log's (after the public RetailRocket dump): UUID-like visitor and item ids,
millisecond timestamps, event kinds ``view`` / ``addtocart`` / ``transaction``, an item file
(``category``, ``price``, ``tags``) and no user file. :func:`write_shop` writes the files and the
dataset description that maps them, so the whole path a team's own log takes is exercised.

Structure (so a model can beat "most popular"): each visitor has two favourite categories; a
session picks one of them (or, sometimes, any category by popularity) and views a few items of it,
Zipf-distributed within the category; a viewed item is added to the cart now and then, and a cart
item bought now and then. Everything is seeded and deterministic.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from streamrec.datasets.synthetic import zipf_item_probabilities

START = datetime(2026, 3, 1, tzinfo=UTC)
KIND_VALUES = {"view": "view", "addtocart": "add_to_cart", "transaction": "purchase"}
DESCRIPTION_FILE = "shop.toml"

DESCRIPTION_TOML = """\
# A synthetic shop (streamrec.datasets.shop); the layout a team's own retail log has.
name = "{name}"

[interactions]
path = "events.csv"
user = "visitorid"
item = "itemid"
timestamp = "timestamp"
time_unit = "ms"
kind = "event"

[kinds]
view = "view"
addtocart = "add_to_cart"
transaction = "purchase"

[items]
path = "items.csv"
id = "itemid"
attributes = [
  {{ name = "category", type = "categorical", column = "categoryid" }},
  {{ name = "price", type = "numeric" }},
  {{ name = "tags", type = "multi_categorical", separator = "|", max_tokens = 4 }},
]
"""


@dataclass(frozen=True)
class ShopShape:
    """How big the shop is and how its visitors behave."""

    n_users: int = 2_000
    n_items: int = 3_000
    n_events: int = 60_000
    n_categories: int = 40
    days: float = 30.0
    favourite_share: float = 0.8  # sessions spent in one of the two favourite categories
    cart_rate: float = 0.12
    purchase_rate: float = 0.35
    seed: int = 0


def _uuids(rng: np.random.Generator, count: int) -> list[str]:
    raw = rng.integers(0, 256, size=(count, 16), dtype=np.uint8)
    return [str(uuid.UUID(bytes=bytes(row))) for row in raw]


def generate_items(shape: ShopShape, rng: np.random.Generator) -> pd.DataFrame:
    """The item file: ``itemid``, ``categoryid``, ``price``, ``tags`` ("|"-separated)."""
    category_share = zipf_item_probabilities(shape.n_categories, 1.0)
    categories = rng.choice(shape.n_categories, size=shape.n_items, p=category_share)
    base_price = np.exp(rng.normal(3.0, 1.0, size=shape.n_categories))
    prices = np.round(base_price[categories] * np.exp(rng.normal(0, 0.3, size=shape.n_items)), 2)
    tags = [
        "|".join(f"t{category}-{tag}" for tag in sorted(set(rng.integers(0, 6, size=2).tolist())))
        for category in categories
    ]
    return pd.DataFrame(
        {
            "itemid": _uuids(rng, shape.n_items),
            "categoryid": [f"c{category}" for category in categories],
            "price": prices,
            "tags": tags,
        }
    )


def generate_events(shape: ShopShape, items: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    """The event log: ``timestamp`` (ms), ``visitorid``, ``event``, ``itemid``, in time order."""
    categories = items["categoryid"].str[1:].astype(int).to_numpy()
    by_category = [np.flatnonzero(categories == category) for category in range(shape.n_categories)]
    in_category = [zipf_item_probabilities(len(rows), 1.1) if len(rows) else None for rows in by_category]
    category_share = np.array([len(rows) for rows in by_category], dtype=np.float64)
    category_share /= category_share.sum()
    users = _uuids(rng, shape.n_users)
    favourites = rng.choice(shape.n_categories, size=(shape.n_users, 2), p=category_share)
    item_ids = items["itemid"].to_numpy()
    span_ms = int(shape.days * 86_400_000)
    rows: list[tuple[int, str, str, str]] = []
    while len(rows) < shape.n_events:
        user = int(rng.integers(shape.n_users))
        if rng.random() < shape.favourite_share:
            category = int(favourites[user, int(rng.integers(2))])
        else:
            category = int(rng.choice(shape.n_categories, p=category_share))
        candidates, weights = by_category[category], in_category[category]
        if weights is None:
            continue
        clock = int(rng.integers(span_ms))
        for item_row in rng.choice(candidates, size=int(rng.integers(2, 8)), p=weights):
            clock += int(rng.integers(5_000, 120_000))
            rows.append((clock, users[user], "view", item_ids[item_row]))
            if rng.random() < shape.cart_rate:
                clock += int(rng.integers(1_000, 30_000))
                rows.append((clock, users[user], "addtocart", item_ids[item_row]))
                if rng.random() < shape.purchase_rate:
                    clock += int(rng.integers(10_000, 300_000))
                    rows.append((clock, users[user], "transaction", item_ids[item_row]))
    start_ms = int(START.timestamp() * 1000)
    frame = pd.DataFrame(rows[: shape.n_events], columns=["timestamp", "visitorid", "event", "itemid"])
    frame["timestamp"] += start_ms
    return frame.sort_values("timestamp", kind="stable").reset_index(drop=True)


def generate(shape: ShopShape | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(events, items) raw frames in the shop's file layout."""
    shape = shape or ShopShape()
    rng = np.random.default_rng(shape.seed)
    items = generate_items(shape, rng)
    return generate_events(shape, items, rng), items


def write_shop(folder: Path, shape: ShopShape | None = None, *, name: str = "shop") -> Path:
    """Write ``events.csv``, ``items.csv`` and the description into ``folder``; return the description's path."""
    events, items = generate(shape)
    folder.mkdir(parents=True, exist_ok=True)
    events.to_csv(folder / "events.csv", index=False)
    items.to_csv(folder / "items.csv", index=False)
    description = folder / DESCRIPTION_FILE
    description.write_text(DESCRIPTION_TOML.format(name=name))
    return description
