"""The dataset description file: a small TOML that says where a team's data is and what it means.

Strict (``extra="forbid"``), so a typo fails with the key's name. Paths are relative to the file.
Example (docs/datasets.md has the full reference)::

    name = "shop"

    [interactions]
    path = "events.csv"          # .csv, .tsv, .parquet, .jsonl
    user = "visitorid"
    item = "itemid"
    timestamp = "timestamp"
    time_unit = "ms"             # s, ms or iso (default: s if numeric, else iso)
    kind = "event"               # optional; without it every row is `default_kind`
    event_id = ""                # optional; without it ids are derived from file, row and content

    [kinds]                      # the file's kind values -> streamrec kinds
    view = "view"
    addtocart = "add_to_cart"
    transaction = "purchase"

    [items]                      # optional; without it the catalog is the items seen
    path = "items.csv"
    id = "itemid"
    attributes = [
      { name = "category", type = "categorical" },
      { name = "price", type = "numeric" },
    ]
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from streamrec.core.attributes import Attribute
from streamrec.core.errors import DatasetError
from streamrec.core.events import InteractionKind

TimeUnit = Literal["s", "ms", "iso"]
FileFormat = Literal["csv", "tsv", "parquet", "jsonl"]
KNOWN_KINDS: tuple[str, ...] = get_args(InteractionKind)


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class InteractionsFile(_Strict):
    """The interaction log and its column mapping (empty string = no such column)."""

    path: Path
    format: FileFormat | None = None
    user: str = "user_id"
    item: str = "item_id"
    timestamp: str = "timestamp"
    time_unit: TimeUnit | None = None
    rating: str | None = None
    kind: str | None = None
    event_id: str | None = None
    default_kind: InteractionKind = "view"

    @field_validator("rating", "kind", "event_id", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value


class AttributesFile(_Strict):
    """A user or item attributes file: one row per id, the declared columns."""

    path: Path
    format: FileFormat | None = None
    id: str
    attributes: tuple[Attribute, ...] = Field(min_length=1)


class DatasetDescription(_Strict):
    """Everything streamrec needs to know about a dataset."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    interactions: InteractionsFile
    kinds: dict[str, InteractionKind] = Field(default_factory=dict)
    items: AttributesFile | None = None
    users: AttributesFile | None = None

    def resolved(self, base: Path) -> DatasetDescription:
        """The same description with every file path made absolute against ``base``."""

        def absolute(path: Path) -> Path:
            return path if path.is_absolute() else (base / path).resolve()

        updates: dict[str, object] = {
            "interactions": self.interactions.model_copy(update={"path": absolute(self.interactions.path)})
        }
        for side in ("items", "users"):
            source = getattr(self, side)
            if source is not None:
                updates[side] = source.model_copy(update={"path": absolute(source.path)})
        return self.model_copy(update=updates)


def read_description(path: Path) -> DatasetDescription:
    """Parse and validate a description file; every problem names the key to fix."""
    if not path.is_file():
        raise DatasetError(f"{path} does not exist; pass a dataset description (.toml), a log file or a preset")
    try:
        payload = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise DatasetError(f"{path} is not valid TOML: {exc}") from exc
    try:
        description = DatasetDescription.model_validate(payload)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or '<root>'}: {error['msg']}" for error in exc.errors()
        )
        raise DatasetError(f"{path}: {problems}") from exc
    return description.resolved(path.parent)


def file_format(path: Path, declared: FileFormat | None) -> FileFormat:
    """The declared format, else the one the suffix names."""
    if declared is not None:
        return declared
    by_suffix: dict[str, FileFormat] = {
        ".csv": "csv",
        ".tsv": "tsv",
        ".txt": "tsv",
        ".parquet": "parquet",
        ".pq": "parquet",
        ".jsonl": "jsonl",
        ".ndjson": "jsonl",
    }
    found = by_suffix.get(path.suffix.lower())
    if found is None:
        raise DatasetError(
            f"{path}: cannot tell the format from {path.suffix!r}; set `format` to csv, tsv, parquet or jsonl"
        )
    return found
