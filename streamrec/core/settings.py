"""The settings base and loader of every streamrec process.

Each process has one settings class next to its code (``streamrec.ops.settings.ReplaySettings``,
``serving.api.settings.ApiSettings``, ...), a subclass of ``CommonSettings``, which holds the
shared sections (Kafka, topics, Redis, paths). Values come, in this order of precedence, from
keyword arguments, ``STREAMREC_*`` environment variables (nested sections use a double
underscore: ``STREAMREC_KAFKA__BOOTSTRAP_SERVERS``), then an optional TOML file named by
``STREAMREC_CONFIG_FILE``.

Strict on purpose: unknown keys in the TOML file are rejected (``extra="forbid"``), and a
``STREAMREC_*`` variable that no registered settings class knows fails at start, naming the
closest valid name. Components register their classes as entry points (group
``streamrec.settings``), so this module names none. It is the only place in the project that
reads the environment. See docs/design/ops.md#settings.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from streamrec.core.contracts import RANKER_MODEL_NAME, RECENT_ITEMS_MAX, TOP_K_EXPORTED
from streamrec.core.errors import SettingsError
from streamrec.core.exploration import Exploration, ExplorationPolicy

ENV_PREFIX = "STREAMREC_"
ENV_NESTED_DELIMITER = "__"
CONFIG_FILE_ENV = f"{ENV_PREFIX}CONFIG_FILE"
PROJECT_ROOT = Path(__file__).resolve().parents[2]


class Section(BaseModel):
    """A frozen settings section that rejects unknown keys (a typo fails at start)."""

    model_config = ConfigDict(frozen=True, extra="forbid")


def read_secret(value: SecretStr | None, file: Path | None, what: str) -> str | None:
    """A secret given either inline (``value``) or as a file holding it (``file``, trailing
    newline dropped); a file keeps it out of the environment, ``ps`` and config dumps."""
    if value is not None and file is not None:
        raise SettingsError(f"{what}: set the secret or the file that holds it, not both")
    if file is None:
        return value.get_secret_value() if value is not None else None
    try:
        return file.read_text().rstrip("\n")
    except OSError as exc:
        raise SettingsError(f"{what}: cannot read {file} ({exc.strerror}); create it or fix the path") from exc


class KafkaSettings(Section):
    """How every process reaches the broker. With ``SSL``/``SASL_SSL``, ``ssl_ca_file`` is the CA
    that signed the brokers' certificates (and ``ssl_cert_file``/``ssl_key_file`` this client's,
    for mutual TLS); with ``SASL_*``, the principal is ``sasl_username`` and its password comes
    from ``sasl_password`` or, better, ``sasl_password_file``. An incomplete combination fails at
    load, naming the variables to set, rather than as a broker disconnect later."""

    bootstrap_servers: str = "127.0.0.1:9092"
    client_id: str = "streamrec"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"] = "SCRAM-SHA-512"
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    sasl_password_file: Path | None = None
    ssl_ca_file: Path | None = None
    ssl_cert_file: Path | None = None
    ssl_key_file: Path | None = None

    @model_validator(mode="after")
    def _credentials_complete(self) -> KafkaSettings:
        if self.security_protocol.startswith("SASL_") and (
            self.sasl_username is None or (self.sasl_password is None and self.sasl_password_file is None)
        ):
            raise ValueError(
                f"security_protocol {self.security_protocol} needs a principal: set STREAMREC_KAFKA__SASL_USERNAME "
                "and STREAMREC_KAFKA__SASL_PASSWORD_FILE (or use PLAINTEXT/SSL)"
            )
        if self.sasl_password is not None and self.sasl_password_file is not None:
            raise ValueError("set kafka.sasl_password or kafka.sasl_password_file, not both (better: the file)")
        if (self.ssl_cert_file is None) != (self.ssl_key_file is None):
            raise ValueError("kafka.ssl_cert_file and kafka.ssl_key_file go together (mutual TLS): set both or neither")
        return self

    @property
    def uses_tls(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    def sasl_secret(self) -> str | None:
        return read_secret(self.sasl_password, self.sasl_password_file, "kafka.sasl_password")

    def client_config(self) -> dict[str, str | int | float | bool]:
        """The librdkafka keys shared by producers, consumers and the admin client."""
        config: dict[str, str | int | float | bool] = {
            "bootstrap.servers": self.bootstrap_servers,
            "client.id": self.client_id,
            "security.protocol": self.security_protocol,
        }
        secret = self.sasl_secret()
        if self.sasl_username is not None and secret is not None:
            config["sasl.mechanism"] = self.sasl_mechanism
            config["sasl.username"] = self.sasl_username
            config["sasl.password"] = secret
        for key, path in (
            ("ssl.ca.location", self.ssl_ca_file),
            ("ssl.certificate.location", self.ssl_cert_file),
            ("ssl.key.location", self.ssl_key_file),
        ):
            if path is not None:
                config[key] = str(path)
        return config


class TopicSettings(Section):
    """Topic names and the layout the project creates them with.

    Partitions and replication change with scale, so they are settings, not code.
    """

    interactions: str = "streamrec.interactions"
    impressions: str = "streamrec.impressions"
    clicks: str = "streamrec.clicks"
    labeled: str = "streamrec.labeled"
    deadletter: str = "streamrec.deadletter"
    partitions: int = Field(default=4, ge=1)
    replication_factor: int = Field(default=1, ge=1)
    # Replicas that must have a record before the broker acknowledges it to an acks=all producer;
    # with replication_factor 3 and 2 here, one broker can die without losing an acknowledged record.
    min_insync_replicas: int = Field(default=1, ge=1)
    retention_ms: int = Field(default=7 * 24 * 3600 * 1000, ge=-1)

    @model_validator(mode="after")
    def _insync_within_replicas(self) -> TopicSettings:
        if self.min_insync_replicas > self.replication_factor:
            raise ValueError(
                f"min_insync_replicas ({self.min_insync_replicas}) cannot exceed replication_factor "
                f"({self.replication_factor}): no write could ever be acknowledged; lower it"
            )
        return self

    def all_names(self) -> list[str]:
        return [self.interactions, self.impressions, self.clicks, self.labeled, self.deadletter]

    @classmethod
    def prefixed(
        cls, prefix: str, partitions: int = 4, replication_factor: int = 1, min_insync_replicas: int = 1
    ) -> TopicSettings:
        """Topics of their own (``<prefix>.interactions`` ...): runs sharing a broker never mix records."""
        return cls(
            interactions=f"{prefix}.interactions",
            impressions=f"{prefix}.impressions",
            clicks=f"{prefix}.clicks",
            labeled=f"{prefix}.labeled",
            deadletter=f"{prefix}.deadletter",
            partitions=partitions,
            replication_factor=replication_factor,
            min_insync_replicas=min_insync_replicas,
        )


class RedisSettings(Section):
    """Where the online store lives. With ``cluster`` on, ``host:port`` is one node of a Redis
    Cluster (clients discover the others from it) and ``db`` must be 0, the only one a cluster has.
    ``username`` and the password (``password`` or ``password_file``) name a Redis ACL user; with
    ``tls`` the client verifies the server against ``ca_file`` (and presents ``cert_file``/``key_file``
    where the server asks for client certificates)."""

    host: str = "127.0.0.1"
    port: int = Field(default=6379, ge=1, le=65535)
    db: int = Field(default=0, ge=0)
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    cluster: bool = False
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    @model_validator(mode="after")
    def _cluster_has_one_db(self) -> RedisSettings:
        if self.cluster and self.db != 0:
            raise ValueError("a Redis Cluster has only database 0; set redis.db = 0 with redis.cluster")
        return self

    @model_validator(mode="after")
    def _tls_files_need_tls(self) -> RedisSettings:
        files = [name for name in ("ca_file", "cert_file", "key_file") if getattr(self, name) is not None]
        if files and not self.tls:
            raise ValueError(f"redis.{', redis.'.join(files)}: used only over TLS; set redis.tls = true or unset them")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("a client certificate needs its key: set both redis.cert_file and redis.key_file")
        return self

    def secret(self) -> str | None:
        return read_secret(self.password, self.password_file, "redis.password")

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments for redis-py's ``Redis``/``RedisCluster``: credentials and TLS."""
        options: dict[str, Any] = {}
        if self.username is not None:
            options["username"] = self.username
        secret = self.secret()
        if secret is not None:
            options["password"] = secret
        if self.tls:
            options["ssl"] = True
            for key, path in (
                ("ssl_ca_certs", self.ca_file),
                ("ssl_certfile", self.cert_file),
                ("ssl_keyfile", self.key_file),
            ):
                if path is not None:
                    options[key] = str(path)
        return options

    def url(self) -> str:
        secret = self.secret()
        user = quote(self.username, safe="") if self.username else ""
        auth = f"{user}:{quote(secret, safe='')}@" if secret else (f"{user}@" if user else "")
        return f"{'rediss' if self.tls else 'redis'}://{auth}{self.host}:{self.port}/{self.db}"


class GrpcSecurity(Section):
    """TLS and caller identity on the gRPC hops (callers -> API; API, trainer, evaluator -> model server).

    A server presents ``cert_file``/``key_file``; with ``client_verify`` it requires a client
    certificate signed by ``ca_file`` (mutual TLS). A caller's identity is its client certificate's
    common name or, without one, the name its bearer token maps to in the server's ``tokens_file``
    (lines ``<identity> <token>``); the admin RPCs (version reloads, label moves) accept only
    ``admin_identities``. A client verifies the server against ``ca_file`` (checking the name
    ``server_name`` when the address is not one the certificate names), presents its own
    certificate for mutual TLS and sends ``token_file``'s token as ``authorization: Bearer``.
    Only paths live here: ``serving.grpc_security`` reads the files once, when a server or
    channel is built.
    """

    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    client_verify: bool = False
    token_file: Path | None = None
    tokens_file: Path | None = None
    admin_identities: tuple[str, ...] = ("trainer", "evaluator", "admin")
    # The host name a client checks the server's certificate for, when the address it dials is
    # not one of the certificate's names (an IP, a compose service name); None: the address's host.
    server_name: str | None = None

    @model_validator(mode="after")
    def _certificate_with_its_key(self) -> GrpcSecurity:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("grpc.cert_file and grpc.key_file go together: set both (or neither)")
        return self


class PathSettings(Section):
    """Where the project keeps what it downloads and what its services write."""

    cache_dir: Path = PROJECT_ROOT / ".cache"
    state_dir: Path = PROJECT_ROOT / ".state"

    @property
    def kafka_libs_dir(self) -> Path:
        return self.cache_dir / "kafka" / "libs"


class SliceTuning(Section):
    """How models are judged per segment (``streamrec.core.segments``), by the trainer's gate and the
    A/B evaluator alike, so both flag the same losses.

    ``user_activity_bounds``: ascending history lengths where a new activity bucket starts (with
    (5, 20): 0-4, 5-19, 20+); a history length is the user's distinct recent items as the model saw
    them (the ``recent_items`` input, at most ``contracts.RECENT_ITEMS_MAX``), the one length both the
    trainer's hold-out and the API's logged features carry. ``item_popularity_bounds``:
    (torso_from, head_from) interaction counts; below torso_from an item is in the tail. A version
    that wins overall but whose figure on a segment with at least ``min_examples`` examples is below
    the baseline's by more than ``flag_loss`` (relative: 0.2 = 20 % lower) is flagged.
    """

    user_activity_bounds: tuple[int, ...] = (5, 20)
    item_popularity_bounds: tuple[int, int] = (10, 100)
    min_examples: int = Field(default=50, ge=1)
    flag_loss: float = Field(default=0.2, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _bounds_ascending(self) -> SliceTuning:
        for name, bounds in (
            ("user_activity_bounds", self.user_activity_bounds),
            ("item_popularity_bounds", self.item_popularity_bounds),
        ):
            if not bounds or bounds[0] < 1 or any(low >= high for low, high in zip(bounds, bounds[1:], strict=False)):
                raise ValueError(f"slices.{name} {bounds} must be strictly ascending positive counts, e.g. (5, 20)")
        if self.user_activity_bounds[-1] > RECENT_ITEMS_MAX:
            raise ValueError(
                f"slices.user_activity_bounds {self.user_activity_bounds} go beyond {RECENT_ITEMS_MAX}, the most "
                "recent items a history length counts, so a bucket would stay empty; lower the last bound"
            )
        return self


class ExplorationTuning(Section):
    """How the API explores (``streamrec.core.exploration``), read by the API that serves under it
    and by the trainer that weighs a candidate's choices against the logged propensities, so
    both agree. Each of the last ``slots`` positions of a single model's list shows, with
    probability ``epsilon``, an item drawn from the ``pool_size`` candidates ranked below the list,
    uniformly (``epsilon_greedy``) or by a softmax over their scores at ``temperature``."""

    policy: ExplorationPolicy = "none"
    epsilon: float = Field(default=0.1, ge=0.0, le=1.0)
    slots: int = Field(default=1, ge=0, le=TOP_K_EXPORTED)
    pool_size: int = Field(default=20, ge=1, le=TOP_K_EXPORTED)
    temperature: float = Field(default=1.0, gt=0)

    def rules(self) -> Exploration:
        return Exploration(self.policy, self.epsilon, self.slots, self.pool_size, self.temperature)


class RankingTuning(Section):
    """The ranking stage, read by the API (re-rank), the trainer (fine-tune and publish the
    ranking model) and the evaluator (move its labels with the retrieval model's): with
    ``enabled``, the API retrieves ``candidates`` items with the retrieval model and orders them
    by the ranking model ``model_name`` (``contracts.RANK_SIGNATURE``); off, the retrieval order
    is served, so the two lists can be compared on the same stack."""

    enabled: bool = False
    candidates: int = Field(default=100, ge=1, le=TOP_K_EXPORTED)
    model_name: str = Field(default=RANKER_MODEL_NAME, min_length=1)


class CommonSettings(BaseSettings):
    """Sections every process shares. Subclass it once per process."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED_DELIMITER,
        extra="forbid",
        frozen=True,
        case_sensitive=False,
    )

    kafka: KafkaSettings = KafkaSettings()
    topics: TopicSettings = TopicSettings()
    redis: RedisSettings = RedisSettings()
    grpc: GrpcSecurity = GrpcSecurity()
    paths: PathSettings = PathSettings()
    slices: SliceTuning = SliceTuning()
    exploration: ExplorationTuning = ExplorationTuning()
    ranking: RankingTuning = RankingTuning()
    # The dataset every command works on unless --dataset says otherwise: a preset (ml-100k,
    # synthetic[:options]), a description file (.toml) or a log file (streamrec.datasets.description).
    dataset: str = Field(default="ml-100k", min_length=1)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get(CONFIG_FILE_ENV)
        if config_file:
            path = Path(config_file)
            if not path.is_file():
                raise SettingsError(f"{CONFIG_FILE_ENV}={config_file!r} does not name a file.")
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)


# Components register their settings classes as entry points of this group in pyproject.toml
# (``[project.entry-points."streamrec.settings"]``), each naming a tuple of classes. All processes
# of one stack share one environment, so the check below accepts a variable that any registered
# class knows. The registered modules import nothing heavy (no TensorFlow, no Faust).
SETTINGS_ENTRY_POINT_GROUP = "streamrec.settings"
_EXTRA_ENV_NAMES: frozenset[str] = frozenset({CONFIG_FILE_ENV})


def all_settings_classes() -> list[type[CommonSettings]]:
    """Every settings class registered under ``SETTINGS_ENTRY_POINT_GROUP``, in a stable order."""
    from importlib.metadata import entry_points

    classes: list[type[CommonSettings]] = []
    for entry_point in sorted(entry_points(group=SETTINGS_ENTRY_POINT_GROUP), key=lambda point: point.name):
        registered = entry_point.load()
        for settings_cls in registered:
            if not (isinstance(settings_cls, type) and issubclass(settings_cls, CommonSettings)):
                raise SettingsError(
                    f"Entry point {entry_point.name} = {entry_point.value!r} of group {SETTINGS_ENTRY_POINT_GROUP} "
                    "must name a tuple of CommonSettings subclasses; fix it in pyproject.toml and reinstall."
                )
            classes.append(settings_cls)
    if not classes:
        raise SettingsError(
            f"No settings are registered under the entry point group {SETTINGS_ENTRY_POINT_GROUP}: "
            "streamrec is not installed in this environment; run `make setup` (pip install -e .)."
        )
    return classes


def _env_names(model: type[BaseModel], prefix: str) -> set[str]:
    names: set[str] = set()
    for field_name, field in model.model_fields.items():
        name = f"{prefix}{field_name}".upper()
        names.add(name)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names |= _env_names(annotation, f"{name}{ENV_NESTED_DELIMITER}")
    return names


def known_env_names() -> set[str]:
    names = set(_EXTRA_ENV_NAMES)
    for settings_cls in all_settings_classes():
        names |= _env_names(settings_cls, ENV_PREFIX)
    return names


def check_environment(environ: dict[str, str] | None = None) -> None:
    """Fail on any ``STREAMREC_*`` variable that no process knows, naming the closest match."""
    env = os.environ if environ is None else environ
    known = known_env_names()
    unknown = sorted(key for key in env if key.upper().startswith(ENV_PREFIX) and key.upper() not in known)
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key.upper(), known, n=1)
            hints.append(f"{key} (did you mean {close[0]}?)" if close else key)
        raise SettingsError(
            "Unknown streamrec setting(s) in the environment: "
            + ", ".join(hints)
            + ". Fix or unset them; valid names are listed by `streamrec settings`."
        )


SettingsT = TypeVar("SettingsT", bound=CommonSettings)


def load(settings_cls: type[SettingsT], **overrides: Any) -> SettingsT:
    """Build a process's settings after checking the environment for typos.

    A pydantic validation error (bad value, unknown key in the config file) is re-raised as a
    ``SettingsError`` whose message names every offending key.
    """
    from pydantic import ValidationError

    check_environment()
    try:
        return settings_cls(**overrides)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(part) for part in err['loc'])}: {err['msg']}" for err in exc.errors())
        raise SettingsError(f"Invalid {settings_cls.__name__}: {problems}") from exc


__all__ = [
    "CommonSettings",
    "KafkaSettings",
    "PathSettings",
    "RedisSettings",
    "SliceTuning",
    "TopicSettings",
    "check_environment",
    "known_env_names",
    "load",
]
