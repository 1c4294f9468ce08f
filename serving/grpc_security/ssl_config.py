"""TF Serving's ``--ssl_config_file``: an ``SSLConfig`` text proto, read into a :class:`ServerTls`.

The file is ``tensorflow.serving.SSLConfig`` in protobuf text format (``server_key``,
``server_cert``, ``custom_ca``, ``client_verify``); the first three hold PEM *text*, not paths,
exactly as ``tensorflow_model_server`` reads them (its ``BuildServerCredentialsFromSSLConfigFile``
passes them to gRPC as they are), so one file serves both servers::

    server_key: "-----BEGIN PRIVATE KEY-----\\n...\\n-----END PRIVATE KEY-----\\n"
    server_cert: "-----BEGIN CERTIFICATE-----\\n...\\n-----END CERTIFICATE-----\\n"
    custom_ca: "-----BEGIN CERTIFICATE-----\\n...\\n-----END CERTIFICATE-----\\n"
    client_verify: true

The ``tensorflow-serving-api`` wheel does not ship ``ssl_config_pb2`` (only the server's build
has it), so when it cannot be imported the message is declared here with TF Serving's package,
name, field names and numbers, in a pool of its own, and parsed by the same text-format parser.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format

from serving.grpc_security.credentials import ServerTls
from streamrec.core.errors import SettingsError

_FIELDS = (
    ("server_key", descriptor_pb2.FieldDescriptorProto.TYPE_STRING),
    ("server_cert", descriptor_pb2.FieldDescriptorProto.TYPE_STRING),
    ("custom_ca", descriptor_pb2.FieldDescriptorProto.TYPE_STRING),
    ("client_verify", descriptor_pb2.FieldDescriptorProto.TYPE_BOOL),
)


@functools.cache
def ssl_config_class() -> Any:
    """``tensorflow.serving.SSLConfig``: TF Serving's generated class if installed, else the same
    message (``tensorflow_serving/config/ssl_config.proto``) declared from its four fields."""
    try:
        from tensorflow_serving.config import ssl_config_pb2

        return ssl_config_pb2.SSLConfig
    except ImportError:
        pass
    proto = descriptor_pb2.FileDescriptorProto(
        name="tensorflow_serving/config/ssl_config.proto", package="tensorflow.serving", syntax="proto3"
    )
    message = proto.message_type.add(name="SSLConfig")
    for number, (name, kind) in enumerate(_FIELDS, start=1):
        message.field.add(name=name, number=number, type=kind, label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.serving.SSLConfig"))


def read_ssl_config(path: Path) -> ServerTls:
    """The TLS of ``path`` (an ``SSLConfig`` text proto); an error naming the file and the fix."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise SettingsError(f"--ssl_config_file: cannot read {path} ({exc.strerror})") from exc
    config = ssl_config_class()()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        # only the position: the parser's own message may quote a piece of the key
        raise SettingsError(
            f"--ssl_config_file {path} is not an SSLConfig text proto (line {exc.GetLine()}, column "
            f"{exc.GetColumn()}); its fields are server_key, server_cert, custom_ca (quoted PEM text, "
            "not paths) and client_verify"
        ) from None
    missing = [name for name in ("server_key", "server_cert") if not getattr(config, name).strip()]
    if missing:
        raise SettingsError(f"--ssl_config_file {path} has no {' or '.join(missing)}; both hold PEM text")
    for name in ("server_key", "server_cert", "custom_ca"):
        value = getattr(config, name)
        if value and "-----BEGIN" not in value:
            raise SettingsError(
                f"--ssl_config_file {path}: {name} does not hold PEM text; SSLConfig takes the file's "
                "contents (as TF Serving does), not its path"
            )
    return ServerTls(
        private_key=config.server_key.encode(),
        certificate_chain=config.server_cert.encode(),
        root_certificates=config.custom_ca.encode() or None,
        client_verify=config.client_verify,
    )
