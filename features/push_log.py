"""The offline log of pushed stream rows: a parquet *directory* per stream view, one file per push.

Why not ``store.push(..., to=PushMode.OFFLINE)``: Feast 0.67's file offline store
(``DaskOfflineStore.offline_write_batch``) reads the whole parquet file, concatenates the new
rows and rewrites it, so every push costs O(rows so far), and it cannot log a list column.
A directory is still one Feast source: its file offline store reads sources with
``dd.read_parquet(path)``, which takes a directory, and ``features.history`` reads the files in
write order. ``compact`` merges the files when there are many (a read opens every file).

Files are written under a dot-name and renamed into place, and readers (pyarrow, dask) skip
dot-files, so a reader never sees half a file. Each directory starts with an empty seed file
that carries the schema, so reads work before the first push.
See docs/design/features.md#push.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from features import views
from streamrec.core.attributes import AttributeSchema, read_schema

SEED_NAME = "00000000000000000000-seed.parquet"


def write_parquet_atomically(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def ensure_layout(data_dir: Path, schema: AttributeSchema | None = None) -> None:
    """Create the data dir and each stream view's log directory with its schema seed.

    ``schema`` None: the one stored in ``data_dir``. An existing seed is kept; ``reset`` removes
    the logs when the dataset changes (``features.store.setup_dataset``).
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    for view in views.stream_views(read_schema(data_dir) if schema is None else schema):
        _seed(data_dir, view)


def _seed(data_dir: Path, view: views.StreamView) -> None:
    log_dir = views.push_log_dir(data_dir, view.view_name)
    log_dir.mkdir(parents=True, exist_ok=True)
    seed = log_dir / SEED_NAME
    if not seed.exists():
        write_parquet_atomically(view.schema.empty_table(), seed)


def reset(data_dir: Path, schema: AttributeSchema) -> None:
    """Remove every stream view's log (another dataset's rows) and seed it again for ``schema``."""
    shutil.rmtree(data_dir / views.PUSH_LOG_DIR, ignore_errors=True)
    ensure_layout(data_dir, schema)


def append(data_dir: Path, view: views.StreamView, table: pa.Table) -> Path:
    """Add one file holding ``table`` (already validated against ``view.schema``)."""
    log_dir = views.push_log_dir(data_dir, view.view_name)
    if not (log_dir / SEED_NAME).exists():
        _seed(data_dir, view)
    # Names sort by time of writing, which makes the directory easy to inspect and compact.
    path = log_dir / f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}.parquet"
    write_parquet_atomically(table, path)
    return path


def files(data_dir: Path, view: views.StreamView) -> list[Path]:
    return sorted(p for p in views.push_log_dir(data_dir, view.view_name).glob("*.parquet") if p.name != SEED_NAME)


def compact(data_dir: Path, view: views.StreamView) -> int:
    """Merge the view's push files into one; returns the number of files merged.

    The merged file is in place before the old ones are removed, so a concurrent reader may
    see a row twice but never misses one; duplicate rows (same key, same event time, same
    values) are harmless to a point-in-time join. Run it when no push is in flight for the
    view, or accept that a push landing meanwhile is kept (it is not in the merged list).
    """
    to_merge = files(data_dir, view)
    if len(to_merge) < 2:
        return 0
    merged = pa.concat_tables([pq.read_table(path, schema=view.schema) for path in to_merge])
    append(data_dir, view, merged)
    for path in to_merge:
        path.unlink()
    return len(to_merge)
