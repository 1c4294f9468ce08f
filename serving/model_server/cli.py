"""``streamrec model-server``: the local TF-Serving-compatible model server.

Flags are ``tensorflow_model_server``'s where they overlap (``--port``, ``--model_config_file``,
``--model_name``, ``--model_base_path``, ``--file_system_poll_wait_seconds``, ...), so the same
command line (minus the binary) runs the real TF Serving. Every flag falls back to the
``model_server`` settings section (``STREAMREC_MODEL_SERVER__*``); TLS and caller identity come
from the ``grpc`` section (``STREAMREC_GRPC__*``), TLS from TF Serving's ``--ssl_config_file``
instead when it is given. When no ``--model_config_file`` is given, the settings' ``models.config``
is used if it exists (it holds the labels the model client wrote), otherwise
``--model_name``/``--model_base_path`` serve the latest version.

Mount it in the main CLI with ``app.command("model-server")(model_server_command)``.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Annotated, TypeVar

import typer

ENV = "STREAMREC_MODEL_SERVER__"
T = TypeVar("T")


def _help(text: str, setting: str) -> str:
    # parentheses, not brackets: typer's rich help would read "[...]" as markup and drop it
    return f"{text} (default: setting model_server.{setting}, env {ENV}{setting.split()[0].upper()})"


def model_server_command(
    port: Annotated[int | None, typer.Option("--port", help=_help("gRPC port (0: any free port).", "port"))] = None,
    host: Annotated[str | None, typer.Option("--host", help=_help("Interface to listen on.", "host"))] = None,
    model_config_file: Annotated[
        Path | None,
        typer.Option("--model_config_file", help=_help("ModelServerConfig text file.", "model_config_file")),
    ] = None,
    model_name: Annotated[
        str | None, typer.Option("--model_name", help=_help("Model name (without a config file).", "model_name"))
    ] = None,
    model_base_path: Annotated[
        Path | None,
        typer.Option("--model_base_path", help=_help("Directory of <version>/ dirs.", "model_base_path")),
    ] = None,
    file_system_poll_wait_seconds: Annotated[
        float | None,
        typer.Option(
            "--file_system_poll_wait_seconds",
            help=_help("Seconds between polls for new versions (0: once).", "file_system_poll_wait_seconds"),
        ),
    ] = None,
    model_config_file_poll_wait_seconds: Annotated[
        float | None,
        typer.Option(
            "--model_config_file_poll_wait_seconds",
            help=_help("Seconds between config file polls (0: off).", "model_config_file_poll_wait_seconds"),
        ),
    ] = None,
    allow_version_labels_for_unavailable_models: Annotated[
        bool | None,
        typer.Option(
            "--allow_version_labels_for_unavailable_models/--no-allow_version_labels_for_unavailable_models",
            help=_help(
                "Allow NEW labels on versions not loaded yet (needed to start with labels in the config).",
                "allow_version_labels_for_unavailable_models",
            ),
        ),
    ] = None,
    num_load_threads: Annotated[
        int | None, typer.Option("--num_load_threads", help=_help("Parallel loads.", "num_load_threads"))
    ] = None,
    max_num_load_retries: Annotated[
        int | None,
        typer.Option("--max_num_load_retries", help=_help("Retries of a failed load.", "max_num_load_retries")),
    ] = None,
    load_retry_interval_micros: Annotated[
        int | None,
        typer.Option(
            "--load_retry_interval_micros",
            help=_help("Microseconds between load retries.", "load_retry_interval_s (seconds)"),
        ),
    ] = None,
    ssl_config_file: Annotated[
        Path | None,
        typer.Option(
            "--ssl_config_file",
            help=_help("SSLConfig text proto (PEM text, as TF Serving's) to serve TLS with.", "ssl_config_file"),
        ),
    ] = None,
    # 8, as ``api.max_workers``: see docs/design/serving.md#server-threads (both were set alike)
    grpc_max_threads: Annotated[int, typer.Option("--grpc_max_threads", help="Threads serving RPCs.", min=1)] = 8,
    tensorflow_intra_op_parallelism: Annotated[
        int | None,
        typer.Option(
            "--tensorflow_intra_op_parallelism",
            help=_help("Threads one TF op may use (0: one per core).", "tf_intra_op_threads"),
        ),
    ] = None,
    enable_batching: Annotated[
        bool | None,
        typer.Option(
            "--enable_batching/--noenable_batching",
            help=_help("Merge concurrent Predicts into one model call.", "enable_batching"),
        ),
    ] = None,
    max_batch_size: Annotated[
        int | None,
        typer.Option("--max_batch_size", help=_help("Rows in one batched model call.", "max_batch_size"), min=1),
    ] = None,
    batch_timeout_micros: Annotated[
        int | None,
        typer.Option(
            "--batch_timeout_micros",
            help=_help("How long a batch waits to fill (0: only what queued).", "batch_timeout_micros"),
            min=0,
        ),
    ] = None,
    tensorflow_inter_op_parallelism: Annotated[
        int | None,
        typer.Option(
            "--tensorflow_inter_op_parallelism",
            help=_help("TF ops run in parallel (0: one per core).", "tf_inter_op_threads"),
        ),
    ] = None,
) -> None:
    """Serve SavedModels over TF Serving's gRPC API (PredictionService, ModelService, health)."""
    from serving.model_server.batching import BatchingOptions
    from serving.model_server.core import CoreOptions
    from serving.model_server.metrics import serve as serve_metrics
    from serving.model_server.server import ModelServer, ServerOptions
    from serving.protocol.errors import ModelServerError
    from serving.runtime import tune_serving_process
    from serving.settings import ServingSettings
    from streamrec.core.errors import SettingsError
    from streamrec.core.settings import load

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = load(ServingSettings)
    section = settings.model_server
    if model_config_file is None and model_name is None and model_base_path is None:
        if settings.model_config_file.exists():
            model_config_file = settings.model_config_file
    if model_config_file is None:
        model_name = model_name or section.model_name
        model_base_path = model_base_path or settings.model_base_path
        model_base_path.mkdir(parents=True, exist_ok=True)
    options = ServerOptions(
        host=host or section.host,
        port=section.port if port is None else port,
        model_config_file=model_config_file,
        model_name=model_name,
        model_base_path=model_base_path,
        file_system_poll_wait_seconds=_pick(file_system_poll_wait_seconds, section.file_system_poll_wait_seconds),
        model_config_file_poll_wait_seconds=_pick(
            model_config_file_poll_wait_seconds, section.model_config_file_poll_wait_seconds
        ),
        grpc_max_message_mb=section.grpc_max_message_mb,
        grpc_workers=grpc_max_threads,
        max_concurrent_rpcs=section.max_concurrent_rpcs,
        security=settings.grpc,
        ssl_config_file=_pick(ssl_config_file, section.ssl_config_file),
        model_root=settings.model_root,
        core=CoreOptions(
            num_load_threads=_pick(num_load_threads, section.num_load_threads),
            max_num_load_retries=_pick(max_num_load_retries, section.max_num_load_retries),
            load_retry_interval_s=(
                section.load_retry_interval_s
                if load_retry_interval_micros is None
                else load_retry_interval_micros / 1e6
            ),
            allow_version_labels_for_unavailable_models=_pick(
                allow_version_labels_for_unavailable_models, section.allow_version_labels_for_unavailable_models
            ),
            batching=BatchingOptions(
                enabled=_pick(enable_batching, section.enable_batching),
                max_batch_size=_pick(max_batch_size, section.max_batch_size),
                batch_timeout_micros=_pick(batch_timeout_micros, section.batch_timeout_micros),
                pad_variable_length_inputs=section.pad_variable_length_inputs,
            ),
        ),
    )
    set_tf_threads(
        _pick(tensorflow_intra_op_parallelism, section.tf_intra_op_threads),
        _pick(tensorflow_inter_op_parallelism, section.tf_inter_op_threads),
    )
    try:
        server = ModelServer(options)  # reads the TLS and token files
    except (SettingsError, ValueError) as exc:
        typer.echo(f"model server did not start: {exc}", err=True)
        raise typer.Exit(1) from exc
    stopping = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        logging.getLogger(__name__).info("signal %d: stopping", signum)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server.start()
    except ModelServerError as exc:
        typer.echo(f"model server did not start: {exc.message}", err=True)
        if "not currently available" in exc.message:
            typer.echo("labels in the config need --allow_version_labels_for_unavailable_models at start", err=True)
        raise typer.Exit(1) from exc
    tune_serving_process(section)  # after the first versions loaded
    serve_metrics(section.metrics_port, section.host)
    typer.echo(f"model server ready on {options.host}:{server.port}", err=True)
    stopping.wait()
    server.stop()


def set_tf_threads(intra_op: int, inter_op: int) -> None:
    """Size TensorFlow's pools; must run before the first TF op (TF refuses changes after it)."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(intra_op)
    tf.config.threading.set_inter_op_parallelism_threads(inter_op)


def _pick(flag: T | None, setting: T) -> T:
    return setting if flag is None else flag


app = typer.Typer(add_completion=False, help=__doc__, pretty_exceptions_show_locals=False)
app.command("model-server")(model_server_command)

if __name__ == "__main__":
    typer.run(model_server_command)
