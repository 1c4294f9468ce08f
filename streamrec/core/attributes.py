"""The declared user and item attributes of a dataset: what the feature views hold and the towers read.

A dataset description (``streamrec.datasets.description``) declares whatever columns a team has;
``streamrec features setup`` writes the resulting :class:`AttributeSchema` next to the feature
repo's data (``attribute_schema.json``), and every side builds from it:

* **Feast** (``features/views.py``): ``user_profile`` and ``item_profile`` hold one feature per
  attribute, typed by :data:`AttributeType` (``categorical`` -> String, ``multi_categorical`` ->
  Array(String), ``numeric`` -> Float64). A schema with no attribute on a side has no profile view
  on that side.
* **The model** (``online_trainer``): the user tower reads each user attribute as a signature input
  of the same name (string [B], string [B, M] "" padded, float32 [B] NaN when unknown); the item
  tower reads item attributes from the catalog baked into the version. Categorical tokens are
  hashed inside the model; numerics are bucketized there with the declared ``boundaries``.
* **Serving**: the API passes the profile row as Feast returns it; it never names an attribute.

Event kinds: ``event_kinds`` are the canonical kinds the dataset has (``streamrec.core.events``);
when there are several, the stream views count each kind on its own (:func:`kind_count_feature`).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from streamrec.core.errors import DatasetError

AttributeType = Literal["categorical", "multi_categorical", "numeric"]
Side = Literal["user", "item"]

SCHEMA_FILE = "attribute_schema.json"
COUNTED_WINDOWS = ("count_1h", "count_24h")
# Names the model signature or the stream views already use: an attribute may not take them.
RESERVED_NAMES = frozenset(
    {
        "user_id",
        "item_id",
        "recent_items",
        "count_1h",
        "count_24h",
        "last_event_ts",
        "trending_score",
        "exclude_items",
        "item_ids",
        "event_timestamp",
        "kind",
    }
)
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


def kind_count_feature(kind: str, window: str = "count_24h") -> str:
    """The stream feature counting one event kind in a window, e.g. ``purchase_count_24h``."""
    return f"{kind}_{window}"


class Attribute(BaseModel):
    """One declared column: its feature name, where it comes from and how the model reads it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    type: AttributeType
    column: str | None = Field(default=None, description="source column in the file (default: name)")
    separator: str = Field(default="|", min_length=1, description="multi_categorical: token separator in a file")
    max_tokens: int = Field(default=8, ge=1, le=256, description="multi_categorical: tokens the model reads")
    truncate: int | None = Field(default=None, ge=1, description="categorical: keep the first N characters")
    boundaries: tuple[float, ...] = Field(
        default=(), description="numeric: bucket edges, ascending (empty: deciles of the data at load)"
    )

    @field_validator("name")
    @classmethod
    def _valid_name(cls, name: str) -> str:
        if not _NAME.match(name):
            raise ValueError(
                f"attribute name {name!r} must be lower-case letters, digits and '_' and start with a letter "
                "(it becomes a Feast feature and a model input name); rename it and set `column` to the file's column"
            )
        if name in RESERVED_NAMES or "__" in name:
            raise ValueError(f"attribute name {name!r} is reserved by streamrec; rename it and set `column`")
        return name

    @model_validator(mode="after")
    def _valid_boundaries(self) -> Attribute:
        edges = self.boundaries
        if self.type != "numeric" and edges:
            raise ValueError(f"attribute {self.name!r}: boundaries only apply to numeric attributes")
        if any(not math.isfinite(edge) for edge in edges) or list(edges) != sorted(set(edges)):
            raise ValueError(f"attribute {self.name!r}: boundaries must be finite and strictly ascending")
        return self

    @property
    def source_column(self) -> str:
        return self.column or self.name


class AttributeSchema(BaseModel):
    """Every declared attribute of both sides, and the dataset's event kinds."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    user: tuple[Attribute, ...] = ()
    item: tuple[Attribute, ...] = ()
    event_kinds: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _unique_names(self) -> AttributeSchema:
        for side, attributes in (("user", self.user), ("item", self.item)):
            names = [attribute.name for attribute in attributes]
            duplicates = sorted({name for name in names if names.count(name) > 1})
            if duplicates:
                raise ValueError(f"{side} attributes {duplicates} are declared twice")
        return self

    def side(self, side: Side) -> tuple[Attribute, ...]:
        return self.user if side == "user" else self.item

    @property
    def counted_kinds(self) -> tuple[str, ...]:
        """Kinds counted on their own in the stream views: all of them when there are several."""
        return self.event_kinds if len(self.event_kinds) > 1 else ()

    def to_json(self) -> str:
        return self.model_dump_json(indent=2, exclude_defaults=False) + "\n"

    @classmethod
    def from_json(cls, text: str, *, source: str = "attribute schema") -> AttributeSchema:
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            raise DatasetError(f"{source} is invalid ({exc}); rerun `streamrec features setup --dataset ...`") from exc


def schema_path(data_dir: Path) -> Path:
    return Path(data_dir) / SCHEMA_FILE


def read_schema(data_dir: Path) -> AttributeSchema:
    """The schema ``features setup`` wrote under ``data_dir``; no file: no attributes (ids and streams only)."""
    path = schema_path(data_dir)
    if not path.is_file():
        return AttributeSchema()
    return AttributeSchema.from_json(path.read_text(), source=str(path))


def write_schema(data_dir: Path, schema: AttributeSchema) -> Path:
    """Write ``attribute_schema.json`` atomically (rename over the old one)."""
    path = schema_path(data_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_suffix(".json.tmp")
    temp.write_text(schema.to_json())
    temp.replace(path)
    return path


def schema_from_json_payload(payload: dict[str, object]) -> AttributeSchema:
    """An :class:`AttributeSchema` from its ``model_dump`` (as stored in a model config)."""
    return AttributeSchema.model_validate(json.loads(json.dumps(payload)))


# -- what each side reads and writes, derived from one schema ------------------------------------

InputKind = Literal["string", "strings", "int", "float"]
_INPUT_KIND: dict[AttributeType, InputKind] = {
    "categorical": "string",
    "multi_categorical": "strings",
    "numeric": "float",
}


def kind_count_features(schema: AttributeSchema) -> tuple[str, ...]:
    """The per-kind window counts both stream views carry (empty for a one-kind dataset)."""
    return tuple(kind_count_feature(kind, window) for kind in schema.counted_kinds for window in COUNTED_WINDOWS)


def user_activity_features(schema: AttributeSchema) -> tuple[str, ...]:
    """Features of the ``user_activity`` stream view, in order."""
    return ("recent_items", *COUNTED_WINDOWS, "last_event_ts", *kind_count_features(schema))


def item_stats_features(schema: AttributeSchema) -> tuple[str, ...]:
    """Features of the ``item_stats`` stream view, in order."""
    return (*COUNTED_WINDOWS, "trending_score", *kind_count_features(schema))


def user_model_inputs(schema: AttributeSchema) -> dict[str, InputKind]:
    """The user inputs of the ``recommend`` and ``score`` signatures, name -> kind, in order.

    ``string`` string [B] ("" unknown); ``strings`` string [B, M] "" padded (``recent_items`` has
    exactly ``RECENT_ITEMS_MAX`` columns, others any M >= 1); ``int`` int64 [B] (0 unknown);
    ``float`` float32 [B] (NaN unknown). The API and the export both build from this.
    """
    inputs: dict[str, InputKind] = {"user_id": "string", "recent_items": "strings"}
    inputs.update({name: "int" for name in (*COUNTED_WINDOWS, *kind_count_features(schema))})
    inputs.update({attribute.name: _INPUT_KIND[attribute.type] for attribute in schema.user})
    return inputs
