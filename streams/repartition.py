"""The item repartition hop: one record per (batch, item partition), not one per event.

The item side needs each item's events on one partition of ``<interactions>.by-item`` (its table
is partitioned like that topic; more workers split it). Forwarding every event as a record of
its own made each event pay for Faust twice (a produce on the user side, then a whole consume:
fetch, conductor, stream, ``take_events``; see docs/design/streams.md#repartition-bundles).
So the user agent groups a batch's valid events by the partition their item hashes to and sends
one *bundle* per partition; the item agent applies every entry of a bundle.

A bundle is JSON ``{"v": 1, "events": [[item_id, event_time_us, event_id, origin_ts], ...]}``:
only what the item state needs, already validated on the user side, plus ``origin_ts``, the
event's Kafka timestamp on the interactions topic, which item freshness is measured from. When
the dataset counts event kinds on their own (``AttributeSchema.counted_kinds``) an entry carries
the event's ``kind`` as a fifth element; a one-kind dataset's entries stay four long (no bytes
for a kind nothing counts), and a four-element entry reads as "kind not counted".

The partition is ``crc32(item_id) mod partitions``: any stable hash works, because only this
worker group writes the topic and every worker computes the same one; the table's changelog
follows the record's partition (see ``streams.pusher``). Changing the partition count (or this
hash) moves items, as it would with keyed records: drain the topic and reset the group first.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

from streamrec.core.errors import EventValidationError
from streamrec.core.events import json_value

BUNDLE_VERSION = 1


@dataclass(frozen=True)
class ItemEvent:
    item_id: str
    time_us: int
    event_id: str
    origin_ts: float
    kind: str | None = None  # the event's kind, only where the item side counts kinds


def item_partition(item_id: str, partitions: int) -> int:
    """The by-item partition of ``item_id`` (see the module docstring)."""
    return zlib.crc32(item_id.encode()) % partitions


def encode(events: Sequence[ItemEvent]) -> bytes:
    rows = [
        [event.item_id, event.time_us, event.event_id, event.origin_ts]
        if event.kind is None
        else [event.item_id, event.time_us, event.event_id, event.origin_ts, event.kind]
        for event in events
    ]
    return json.dumps({"v": BUNDLE_VERSION, "events": rows}, separators=(",", ":")).encode()


def decode(raw: bytes | None) -> list[ItemEvent]:
    """The entries of one bundle, or ``EventValidationError`` (the record is dead-lettered whole)."""
    payload = json_value(raw, "a by-item bundle")
    if (
        not isinstance(payload, dict)
        or payload.get("v") != BUNDLE_VERSION
        or not isinstance(payload.get("events"), list)
    ):
        raise EventValidationError(
            "schema", f'expected a by-item bundle {{"v": {BUNDLE_VERSION}, "events": [...]}} (see streams.repartition)'
        )
    events = []
    for row in payload["events"]:
        if not (
            isinstance(row, list)
            and 4 <= len(row) <= 5
            and isinstance(row[0], str)
            and row[0]
            and type(row[1]) is int
            and isinstance(row[2], str)
            and row[2]
            and isinstance(row[3], int | float)
            and (len(row) == 4 or (isinstance(row[4], str) and row[4]))
        ):
            raise EventValidationError(
                "schema", f"bad by-item bundle entry {row!r}: [item_id, time_us, event_id, ts(, kind)]"
            )
        events.append(ItemEvent(row[0], row[1], row[2], float(row[3]), row[4] if len(row) == 5 else None))
    return events
