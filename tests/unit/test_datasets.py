from __future__ import annotations

import importlib.metadata
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from streamrec.core.errors import DatasetError
from streamrec.datasets import generic, movielens, synthetic

ROWS = [("u1", "i9", "4", "1700000100"), ("u2", "i3", "5", "1700000000"), ("u1", "i3", "2", "1700000050")]


def write_csv(path: Path, newline: str) -> Path:
    lines = ["uid,iid,stars,ts"] + [",".join(row) for row in ROWS]
    path.write_bytes((newline.join(lines) + newline).encode())
    return path


MAPPING = generic.ColumnMapping(user="uid", item="iid", rating="stars", timestamp="ts")


def test_ml100k_is_read_from_the_recbole_wheel() -> None:
    data = movielens.load()
    frame = data.interactions
    assert len(frame) == 100_000
    assert frame["user_id"].nunique() == 943
    assert frame["item_id"].nunique() == 1682
    assert frame["event_time"].is_monotonic_increasing
    assert frame["event_id"].is_unique
    assert set(frame["rating"].unique()) == {1.0, 2.0, 3.0, 4.0, 5.0}
    assert len(data.users) == 943 and set(data.users.columns) >= {"age", "gender", "occupation", "zip_code"}
    assert len(data.items) == 1682
    assert data.items.loc[data.items["item_id"] == "1", "genres"].iloc[0] == [
        "Animation",
        "Children's",
        "Comedy",
    ]


def test_missing_recbole_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_installed(name: str) -> importlib.metadata.Distribution:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(DatasetError, match="pip install --no-deps recbole"):
        movielens.ml100k_dir()


def test_crlf_and_lf_csv_give_the_same_frame(tmp_path: Path) -> None:
    lf = generic.load_interaction_log(write_csv(tmp_path / "a.csv", "\n"), MAPPING)
    crlf = generic.load_interaction_log(write_csv(tmp_path / "b.csv", "\r\n"), MAPPING)
    columns = ["user_id", "item_id", "rating", "event_time", "kind"]
    pd.testing.assert_frame_equal(lf[columns], crlf[columns])
    assert list(lf["user_id"]) == ["u2", "u1", "u1"]  # sorted by time
    assert list(lf["rating"]) == [5.0, 2.0, 4.0]


def test_parquet_with_iso_times_and_event_kinds(tmp_path: Path) -> None:
    path = tmp_path / "log.parquet"
    pd.DataFrame(
        {
            "who": ["a", "b"],
            "what": ["x", "y"],
            "when": ["2026-01-01T00:00:01Z", "2026-01-01T00:00:00Z"],
            "action": ["click", "purchase"],
            "id": ["e1", "e2"],
        }
    ).to_parquet(path)
    mapping = generic.ColumnMapping.parse("user=who,item=what,timestamp=when,rating=,kind=action,event_id=id")
    frame = generic.load_interaction_log(path, mapping)
    assert list(frame["event_id"]) == ["e2", "e1"]
    assert list(frame["kind"]) == ["purchase", "click"]
    assert frame["rating"].isna().all()


def test_generated_event_ids_are_deterministic(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "log.csv", "\n")
    first = generic.load_interaction_log(path, MAPPING)
    second = generic.load_interaction_log(path, MAPPING)
    assert list(first["event_id"]) == list(second["event_id"])


def test_missing_column_is_named(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "log.csv", "\n")
    with pytest.raises(DatasetError, match="timestamp_ms"):
        generic.load_interaction_log(path, generic.ColumnMapping(user="uid", item="iid", timestamp="timestamp_ms"))


def test_bad_mapping_spec_is_explained() -> None:
    with pytest.raises(DatasetError, match="colour=x"):
        generic.ColumnMapping.parse("user=a,colour=x")


def test_synthetic_items_follow_zipf_and_are_seeded() -> None:
    frame = synthetic.generate(n_users=50, n_items=100, n_events=20_000, zipf_exponent=1.2, seed=3)
    again = synthetic.generate(n_users=50, n_items=100, n_events=20_000, zipf_exponent=1.2, seed=3)
    pd.testing.assert_frame_equal(frame, again)
    counts = frame["item_id"].value_counts()
    expected_top_share = synthetic.zipf_item_probabilities(100, 1.2)[0]
    assert counts.index[0] == "i0"
    assert abs(counts.iloc[0] / len(frame) - expected_top_share) < 0.02
    # the head outweighs the tail by orders of magnitude, as in real catalogs
    assert counts.iloc[:10].sum() > 5 * counts.iloc[-50:].sum()
    assert frame["event_time"].is_monotonic_increasing
    assert np.all(frame["user_id"].str.startswith("u"))
