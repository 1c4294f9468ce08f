"""The item catalog the model scores: item ids and the declared item attributes' values.

The catalog is data, not weights: the item tower maps an id and its attribute values to a vector,
so a new item joins with :meth:`ItemCatalog.with_new_items` and is scored from its attributes at
once. It carries the item side of the dataset's schema (``streamrec.core.attributes``), so the
values it holds and the model that reads them cannot disagree; a dataset without item attributes
has a catalog of ids only (:meth:`ItemCatalog.from_items_seen`).

Values are the normalized ones (:mod:`online_trainer.attribute_values`): categorical ``str``,
multi-categorical a tuple of ``str``, numeric ``float`` (NaN unknown).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd

from online_trainer.attribute_values import Value, as_array, normalize, same_values, to_json_value, unknown
from streamrec.core.attributes import Attribute, AttributeSchema
from streamrec.core.errors import DatasetError


@dataclass(frozen=True, eq=False)
class ItemCatalog:
    """Item ids in a fixed order (the row order of exported scores) with their attribute values.

    ``values`` maps each attribute name of ``attributes`` to one normalized value per item.
    """

    item_ids: tuple[str, ...]
    attributes: tuple[Attribute, ...] = ()
    values: Mapping[str, tuple[Value, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.item_ids:
            raise DatasetError("ItemCatalog: the catalog is empty; the model needs at least one item to rank")
        if "" in self.item_ids:
            raise DatasetError("ItemCatalog: an item id is empty; '' is the padding value of the model inputs")
        if len(set(self.item_ids)) != len(self.item_ids):
            seen: set[str] = set()
            duplicate = next(item for item in self.item_ids if item in seen or seen.add(item))  # type: ignore[func-returns-value]
            raise DatasetError(f"ItemCatalog: item id {duplicate!r} appears twice; ids must be unique")
        names = [attribute.name for attribute in self.attributes]
        if sorted(names) != sorted(self.values):
            raise DatasetError(f"ItemCatalog: values are given for {sorted(self.values)}, the attributes are {names}")
        for name, column in self.values.items():
            if len(column) != len(self.item_ids):
                raise DatasetError(
                    f"ItemCatalog: attribute {name!r} has {len(column)} values for {len(self.item_ids)} items"
                )

    def __len__(self) -> int:
        return len(self.item_ids)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ItemCatalog):
            return NotImplemented
        return (
            self.item_ids == other.item_ids
            and self.attributes == other.attributes
            and all(same_values(a, self.values[a.name], other.values[a.name]) for a in self.attributes)
        )

    __hash__ = object.__hash__

    @cached_property
    def index(self) -> Mapping[str, int]:
        """item id -> row, built once per catalog on first use.

        Cached, not rebuilt per call: callers test membership item by item (``item in
        catalog.index`` over an interval's rows), which rebuilding the dict each time made a
        bottleneck of the online trainer (docs/design/trainer.md#catalog-index).
        """
        return {item: row for row, item in enumerate(self.item_ids)}

    @cached_property
    def arrays(self) -> dict[str, np.ndarray]:
        """Each attribute's values as the item tower's input array, in catalog order (built once)."""
        return {a.name: as_array(a, self.values[a.name]) for a in self.attributes}

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_frame(cls, items: pd.DataFrame, schema: AttributeSchema) -> ItemCatalog:
        """From a normalized items frame: ``item_id`` and one column per item attribute of ``schema``."""
        missing = [c for c in ("item_id", *(a.name for a in schema.item)) if c not in items.columns]
        if missing:
            raise DatasetError(
                f"ItemCatalog.from_frame: missing column(s) {missing}; the items frame has {list(items.columns)} "
                "(is it from another dataset than the schema?)"
            )
        return cls(
            item_ids=tuple(str(item) for item in items["item_id"]),
            attributes=schema.item,
            values={a.name: tuple(normalize(a, value) for value in items[a.name]) for a in schema.item},
        )

    @classmethod
    def from_items_seen(cls, item_ids: Iterable[str], schema: AttributeSchema) -> ItemCatalog:
        """The distinct ``item_ids`` (first occurrence order) with unknown attribute values."""
        ids = tuple(dict.fromkeys(str(item) for item in item_ids))
        return cls(ids, schema.item, {a.name: (unknown(a),) * len(ids) for a in schema.item})

    @classmethod
    def for_dataset(
        cls, items: pd.DataFrame | None, item_ids_seen: Iterable[str], schema: AttributeSchema
    ) -> ItemCatalog:
        """Every item of ``items`` (None: no attribute file) plus the seen ids it lacks (unknown values)."""
        if items is None or items.empty:
            return cls.from_items_seen(item_ids_seen, schema)
        catalog = cls.from_frame(items, schema)
        return catalog.with_new_items([item for item in dict.fromkeys(map(str, item_ids_seen))])

    def with_new_items(
        self, item_ids: Sequence[str], attributes: Sequence[Mapping[str, Any]] | None = None
    ) -> ItemCatalog:
        """A catalog with the given items appended (``attributes``: one name -> value mapping per
        item, a missing name is unknown); ids already present are skipped (first wins)."""
        rows = attributes if attributes is not None else [{} for _ in item_ids]
        if len(rows) != len(item_ids):
            raise ValueError(f"with_new_items: {len(rows)} attribute rows for {len(item_ids)} items")
        known = set(self.item_ids)
        new_ids: list[str] = []
        new_values: dict[str, list[Value]] = {a.name: [] for a in self.attributes}
        for item, row in zip(item_ids, rows, strict=True):
            if str(item) in known:
                continue
            known.add(str(item))
            new_ids.append(str(item))
            for a in self.attributes:
                new_values[a.name].append(normalize(a, row.get(a.name)))
        if not new_ids:
            return self
        values = {name: self.values[name] + tuple(column) for name, column in new_values.items()}
        return ItemCatalog(self.item_ids + tuple(new_ids), self.attributes, values)

    def attribute_row(self, item_id: str) -> dict[str, Value]:
        """One item's values by attribute name (unknown values for an item not in the catalog)."""
        row = self.index.get(str(item_id))
        return {a.name: unknown(a) if row is None else self.values[a.name][row] for a in self.attributes}

    # -- persistence -------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "item_ids": list(self.item_ids),
            "attributes": [a.model_dump(mode="json") for a in self.attributes],
            "values": {a.name: [to_json_value(a, v) for v in self.values[a.name]] for a in self.attributes},
        }

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> ItemCatalog:
        if "attributes" not in payload:
            raise DatasetError(
                "this catalog was saved before item attributes were declared per dataset (issue 20); "
                "retrain with `streamrec train` to write a version this trainer can resume"
            )
        attributes = tuple(Attribute.model_validate(a) for a in payload["attributes"])
        values = {a.name: tuple(normalize(a, v) for v in payload["values"][a.name]) for a in attributes}
        return cls(tuple(payload["item_ids"]), attributes, values)


# -- the item tower's inputs --------------------------------------------------------------------


def catalog_arrays(catalog: ItemCatalog) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """ids [N] and each attribute's input array, in catalog order."""
    return np.asarray(catalog.item_ids, dtype=object), catalog.arrays


def item_arrays(catalog: ItemCatalog, item_ids: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The given ids and their attribute arrays from the catalog; an id not in it gets unknown values."""
    index = catalog.index
    rows = np.fromiter((index.get(str(item), -1) for item in item_ids), dtype=np.int64, count=len(item_ids))
    known = rows >= 0
    values: dict[str, np.ndarray] = {}
    for attribute in catalog.attributes:
        column = catalog.arrays[attribute.name]
        filled = as_array(attribute, [unknown(attribute)] * len(item_ids))
        filled[known] = column[rows[known]]
        values[attribute.name] = filled
    return np.asarray(item_ids, dtype=object), values
