"""A new KRaft cluster id never starts with "-" (StorageTool would read it as a missing value)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from streamrec.ops.stack import kafka_broker


def test_an_id_starting_with_a_dash_is_drawn_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    draws = iter([uuid.UUID(bytes=b"\xf8" + bytes(15)), uuid.UUID(bytes=b"\x10" + bytes(15))])
    monkeypatch.setattr(kafka_broker.uuid, "uuid4", lambda: next(draws))
    # 0xF8 encodes to a leading "-" in URL-safe base64, the case that failed a CI run
    cluster_id = kafka_broker._cluster_id(tmp_path)
    assert cluster_id == "EAAAAAAAAAAAAAAAAAAAAA"
    assert len(cluster_id) == 22


def test_a_formatted_storage_keeps_its_id(tmp_path: Path) -> None:
    (tmp_path / "meta.properties").write_text("version=1\ncluster.id=-keptAsIs\n")
    assert kafka_broker._cluster_id(tmp_path) == "-keptAsIs"
