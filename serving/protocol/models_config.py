"""TF Serving's ``models.config``: parse, validate, build and write it atomically.

The file is ``ModelServerConfig`` in protobuf text format, exactly what ``tensorflow_model_server
--model_config_file`` reads::

    model_config_list {
      config {
        name: "streamrec"
        base_path: "/models/streamrec"
        model_platform: "tensorflow"
        model_version_policy { specific { versions: 3 versions: 4 } }
        version_labels { key: "stable" value: 3 }
        version_labels { key: "canary" value: 4 }
      }
    }

The server, the model client (which keeps the labels here so a restarted server comes back with
them) and the docker-compose TF Serving all read the same file, so the file is always replaced
by an atomic rename and never seen half-written.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from serving.protocol.errors import InvalidArgument

ModelServerConfig = model_server_config_pb2.ModelServerConfig
ModelConfig = model_server_config_pb2.ModelConfig


def parse_config(text: str, *, source: str = "models.config") -> model_server_config_pb2.ModelServerConfig:
    config = model_server_config_pb2.ModelServerConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise InvalidArgument(f"{source} is not a ModelServerConfig in text format: {exc}") from exc
    validate_config(config)
    return config


def read_config(path: Path) -> model_server_config_pb2.ModelServerConfig:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise InvalidArgument(f"cannot read model config file {path}: {exc}") from exc
    return parse_config(text, source=str(path))


def format_config(config: model_server_config_pb2.ModelServerConfig) -> str:
    return text_format.MessageToString(config)


def write_config(path: Path, config: model_server_config_pb2.ModelServerConfig) -> None:
    """Replace ``path`` with ``config`` in one rename (a poller never reads half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(format_config(config))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def single_model_config(name: str, base_path: str) -> model_server_config_pb2.ModelServerConfig:
    """What ``--model_name``/``--model_base_path`` mean: one model, latest version served."""
    config = model_server_config_pb2.ModelServerConfig()
    config.model_config_list.config.add(name=name, base_path=base_path, model_platform="tensorflow")
    validate_config(config)
    return config


def validate_config(config: model_server_config_pb2.ModelServerConfig) -> None:
    """Reject what TF Serving rejects (and what this server cannot serve), naming the entry."""
    if config.WhichOneof("config") != "model_config_list":
        raise InvalidArgument(
            "ServerModelConfig type not supported by HandleReloadConfigRequest. "
            "Only ModelConfigList is currently supported"
        )
    seen: set[str] = set()
    for model in config.model_config_list.config:
        if not model.name:
            raise InvalidArgument("a model config entry has no name")
        if model.name in seen:
            raise InvalidArgument(f"Illegal to list model {model.name} multiple times in config list")
        seen.add(model.name)
        if not model.base_path:
            raise InvalidArgument(f"model {model.name} has no base_path")
        if model.model_platform not in ("", "tensorflow"):
            raise InvalidArgument(
                f"model {model.name}: platform {model.model_platform!r} is not supported (only 'tensorflow')"
            )
        policy = model.model_version_policy
        if policy.WhichOneof("policy_choice") == "latest" and policy.latest.num_versions < 0:
            raise InvalidArgument(f"model {model.name}: latest.num_versions must be >= 0")
        if policy.WhichOneof("policy_choice") == "specific" and not policy.specific.versions:
            raise InvalidArgument(f"model {model.name}: specific version policy lists no versions")
        for label, version in model.version_labels.items():
            if not label:
                raise InvalidArgument(f"model {model.name}: empty version label")
            if version < 0:
                raise InvalidArgument(f"model {model.name}: label {label} points to negative version {version}")


def find_model(
    config: model_server_config_pb2.ModelServerConfig, name: str
) -> model_server_config_pb2.ModelConfig | None:
    for model in config.model_config_list.config:
        if model.name == name:
            return model
    return None
