"""The ``--dataset`` and ``--columns`` options every data command shares, and the load that
prints the dataset's summary before anything runs."""

from __future__ import annotations

from typing import Annotated

import typer

from streamrec.datasets.description import Dataset, load_dataset

DatasetOption = Annotated[
    str | None,
    typer.Option(
        "--dataset",
        help="a preset (ml-100k, synthetic[:events=N,items=N]), a description (.toml) or a log file; "
        "default: the STREAMREC_DATASET setting (ml-100k)",
    ),
]
ColumnsOption = Annotated[
    str | None,
    typer.Option(help="column mapping for a bare log file, e.g. user=uid,item=iid,timestamp=ts,rating="),
]


def load_announced(spec: str, columns: str | None = None) -> Dataset:
    """Load a dataset and print its summary before anything runs."""
    dataset = load_dataset(spec, columns=columns)
    typer.echo(dataset.summary(), err=True)
    return dataset
