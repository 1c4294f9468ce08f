"""``--dataset PRESET|PATH``: one loader for every command, whatever the data looks like.

A dataset is a spec string:

* a **preset**: ``ml-100k`` (MovieLens-100K from the recbole wheel, with its user and item
  profiles) or ``synthetic`` (the shop of ``streamrec.datasets.shop``; options after a colon, e.g.
  ``synthetic:events=20000,items=500,seed=1``);
* a **description file** (``.toml``, ``streamrec.datasets.description_file``): the log, its
  column mapping and kinds, optional item and user attribute files;
* a bare **log file** (CSV, TSV, Parquet, JSON lines) with ``columns`` as the mapping: ids and
  stream features only.

Every path ends in a :class:`Dataset`: the interaction frame, the normalized attribute frames and
the :class:`~streamrec.core.attributes.AttributeSchema` they declare. Bad input stops here with one
message naming the fix; :meth:`Dataset.summary` is what commands print before they run.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import pandas as pd

from streamrec.core.attributes import Attribute, AttributeSchema
from streamrec.core.errors import DatasetError
from streamrec.datasets import generic, movielens, shop
from streamrec.datasets.attribute_frames import attribute_frame
from streamrec.datasets.description_file import AttributesFile, DatasetDescription, read_description

PRESETS = ("ml-100k", "synthetic")
ML100K_USER_ATTRIBUTES = (
    Attribute(name="age", type="numeric", boundaries=(18, 25, 35, 45, 50, 56)),
    Attribute(name="gender", type="categorical"),
    Attribute(name="occupation", type="categorical"),
    Attribute(name="zip_prefix", type="categorical", column="zip_code", truncate=movielens.ZIP_PREFIX_LEN),
)
ML100K_ITEM_ATTRIBUTES = (
    Attribute(name="genres", type="multi_categorical", max_tokens=8),
    Attribute(name="release_year", type="numeric", boundaries=tuple(float(year) for year in range(1905, 2051, 5))),
)


@dataclass(frozen=True)
class Dataset:
    """A loaded dataset: interactions, attribute frames (None when not declared) and their schema."""

    name: str
    interactions: pd.DataFrame
    users: pd.DataFrame | None
    items: pd.DataFrame | None
    schema: AttributeSchema

    @property
    def item_ids(self) -> list[str]:
        """The catalog: the item file's ids, else the items seen, in first-seen order."""
        if self.items is not None:
            return self.items["item_id"].tolist()
        return self.interactions["item_id"].drop_duplicates().tolist()

    def summary(self) -> str:
        """Rows, users, items, time range, kinds and attributes, for a person to check before a run."""
        frame = self.interactions
        kinds = frame["kind"].value_counts()
        lines = [
            f"dataset {self.name}: {len(frame):,} interactions, {frame['user_id'].nunique():,} users, "
            f"{frame['item_id'].nunique():,} items seen"
            + (f" ({len(self.items):,} in the item file)" if self.items is not None else ""),
            f"  time range: {frame['event_time'].min().isoformat()} .. {frame['event_time'].max().isoformat()}",
            "  kinds: " + ", ".join(f"{kind} {count:,}" for kind, count in kinds.items()),
        ]
        for side, attributes in (("user", self.schema.user), ("item", self.schema.item)):
            described = ", ".join(f"{attribute.name} ({attribute.type})" for attribute in attributes)
            lines.append(f"  {side} attributes: {described or 'none'}")
        return "\n".join(lines)


def _attributes(
    raw: pd.DataFrame, attributes: tuple[Attribute, ...], *, id_column: str, id_name: str, source: str
) -> tuple[pd.DataFrame, tuple[Attribute, ...]]:
    return attribute_frame(raw, id_column=id_column, id_name=id_name, attributes=attributes, source=source)


def _event_kinds(interactions: pd.DataFrame) -> tuple[str, ...]:
    return tuple(sorted(interactions["kind"].unique()))


def movielens_dataset() -> Dataset:
    """The ``ml-100k`` preset: today's interaction frame, the profiles as declared attributes."""
    data = movielens.load()
    users, user_attributes = _attributes(
        data.users, ML100K_USER_ATTRIBUTES, id_column="user_id", id_name="user_id", source="ml-100k.user"
    )
    items, item_attributes = _attributes(
        data.items, ML100K_ITEM_ATTRIBUTES, id_column="item_id", id_name="item_id", source="ml-100k.item"
    )
    schema = AttributeSchema(user=user_attributes, item=item_attributes, event_kinds=_event_kinds(data.interactions))
    return Dataset("ml-100k", data.interactions, users, items, schema)


def _shop_shape(options: str) -> shop.ShopShape:
    names = {field.name.removeprefix("n_"): field.name for field in fields(shop.ShopShape)}
    values: dict[str, float | int] = {}
    for part in filter(None, (chunk.strip() for chunk in options.split(","))):
        key, sep, value = part.partition("=")
        if not sep or key not in names:
            raise DatasetError(f"synthetic option {part!r} is not KEY=VALUE with KEY in {sorted(names)}")
        try:
            values[names[key]] = float(value) if "." in value else int(value)
        except ValueError as exc:
            raise DatasetError(f"synthetic option {part!r}: {value!r} is not a number") from exc
    return shop.ShopShape(**values)  # type: ignore[arg-type]


def synthetic_dataset(options: str = "") -> Dataset:
    """The ``synthetic`` preset: the shop's raw frames through the same path as a description file."""
    events, items = shop.generate(_shop_shape(options))
    description = read_description_text(shop.DESCRIPTION_TOML.format(name="synthetic"))
    return dataset_from_frames(description, events, items=items, users=None)


def read_description_text(text: str) -> DatasetDescription:
    import tomllib

    return DatasetDescription.model_validate(tomllib.loads(text))


def dataset_from_frames(
    description: DatasetDescription,
    raw_interactions: pd.DataFrame,
    *,
    items: pd.DataFrame | None,
    users: pd.DataFrame | None,
) -> Dataset:
    """Validate and normalize raw frames as ``description`` maps them."""
    log = description.interactions
    mapping = generic.ColumnMapping(
        user=log.user,
        item=log.item,
        timestamp=log.timestamp,
        rating=log.rating,
        kind=log.kind,
        event_id=log.event_id,
        time_unit=log.time_unit,
        default_kind=log.default_kind,
    )
    interactions = generic.interaction_frame(
        raw_interactions, mapping, kinds=description.kinds, source=str(log.path), name=log.path.name
    )
    frames: dict[str, pd.DataFrame | None] = {"users": None, "items": None}
    declared: dict[str, tuple[Attribute, ...]] = {"users": (), "items": ()}
    for side, raw, source in (("users", users, description.users), ("items", items, description.items)):
        if source is None or raw is None:
            continue
        frames[side], declared[side] = _attributes(
            raw, source.attributes, id_column=source.id, id_name=f"{side[:-1]}_id", source=str(source.path)
        )
    schema = AttributeSchema(user=declared["users"], item=declared["items"], event_kinds=_event_kinds(interactions))
    return Dataset(description.name, interactions, frames["users"], frames["items"], schema)


def _read_attributes(source: AttributesFile | None) -> pd.DataFrame | None:
    return None if source is None else generic.read_table(source.path, source.format)


def dataset_from_description(description: DatasetDescription) -> Dataset:
    """Read every file a (resolved) description names and normalize them."""
    log = description.interactions
    return dataset_from_frames(
        description,
        generic.read_table(log.path, log.format),
        items=_read_attributes(description.items),
        users=_read_attributes(description.users),
    )


def load_dataset(spec: str, *, columns: str | None = None) -> Dataset:
    """The dataset a ``--dataset`` value names (module docstring); ``columns`` maps a bare log file."""
    name, _, options = spec.partition(":")
    if name == "ml-100k" and not options:
        return movielens_dataset()
    if name == "synthetic":
        return synthetic_dataset(options)
    path = Path(spec)
    if path.suffix.lower() == ".toml":
        if columns:
            raise DatasetError("--columns applies to a bare log file; put the mapping in the description instead")
        return dataset_from_description(read_description(path))
    if not path.exists():
        raise DatasetError(
            f"dataset {spec!r} is neither a preset {list(PRESETS)} nor an existing file; "
            "pass a description (.toml) or a log file with --columns"
        )
    mapping = generic.ColumnMapping.parse(columns) if columns else generic.ColumnMapping()
    interactions = generic.load_interaction_log(path, mapping)
    return Dataset(path.stem, interactions, None, None, AttributeSchema(event_kinds=_event_kinds(interactions)))
