from __future__ import annotations

from pathlib import Path

import pytest

from streamrec.core.errors import SettingsError
from streamrec.core.settings import check_environment, known_env_names, load
from streamrec.ops.settings import ReplaySettings, StackSettings


def test_defaults_name_the_project_topics() -> None:
    settings = ReplaySettings()
    assert settings.topics.all_names() == [
        "streamrec.interactions",
        "streamrec.impressions",
        "streamrec.clicks",
        "streamrec.labeled",
        "streamrec.deadletter",
    ]


def test_nested_env_vars_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMREC_KAFKA__BOOTSTRAP_SERVERS", "broker:29092")
    monkeypatch.setenv("STREAMREC_TOPICS__PARTITIONS", "12")
    settings = load(ReplaySettings)
    assert settings.kafka.bootstrap_servers == "broker:29092"
    assert settings.topics.partitions == 12


def test_env_var_typo_fails_at_start_with_its_name_and_a_suggestion() -> None:
    with pytest.raises(SettingsError) as caught:
        check_environment({"STREAMREC_KAFKA__BOOTSTRAP_SERVRES": "x", "PATH": "/bin"})
    message = str(caught.value)
    assert "STREAMREC_KAFKA__BOOTSTRAP_SERVRES" in message
    assert "STREAMREC_KAFKA__BOOTSTRAP_SERVERS" in message


def test_env_var_typo_fails_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMREC_REDIS_PORT", "7000")  # single underscore: not a nested key
    with pytest.raises(SettingsError, match="STREAMREC_REDIS_PORT"):
        load(StackSettings)


def test_variables_of_other_processes_are_accepted() -> None:
    # The stack's ports are not replay settings, but one environment serves the whole stack.
    check_environment({"STREAMREC_STACK__KAFKA_PORT": "9092", "STREAMREC_REPLAY__LINGER_MS": "5"})
    assert "STREAMREC_STACK__KAFKA_HEAP_MB" in known_env_names()


def test_config_file_key_typo_fails_with_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "streamrec.toml"
    config.write_text('[kafka]\nbootstrap_server = "broker:9092"\n')
    monkeypatch.setenv("STREAMREC_CONFIG_FILE", str(config))
    with pytest.raises(SettingsError, match=r"kafka\.bootstrap_server"):
        load(ReplaySettings)


def test_config_file_values_are_used_and_env_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "streamrec.toml"
    config.write_text('[kafka]\nbootstrap_servers = "fromfile:9092"\n[topics]\npartitions = 8\n')
    monkeypatch.setenv("STREAMREC_CONFIG_FILE", str(config))
    monkeypatch.setenv("STREAMREC_TOPICS__PARTITIONS", "2")
    settings = load(ReplaySettings)
    assert settings.kafka.bootstrap_servers == "fromfile:9092"
    assert settings.topics.partitions == 2


def test_invalid_value_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMREC_STACK__KAFKA_HEAP_MB", "4096")
    with pytest.raises(SettingsError, match="stack.kafka_heap_mb"):
        load(StackSettings)


def test_missing_config_file_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMREC_CONFIG_FILE", "/nonexistent/streamrec.toml")
    with pytest.raises(SettingsError, match="/nonexistent/streamrec.toml"):
        load(ReplaySettings)


def test_settings_are_frozen() -> None:
    settings = ReplaySettings()
    with pytest.raises(ValueError, match="frozen"):
        settings.topics.partitions = 3  # type: ignore[misc]


def test_every_component_registers_its_settings_through_the_entry_point_group() -> None:
    """The core knows components only through ``[project.entry-points."streamrec.settings"]``."""
    import tomllib

    from streamrec.core.settings import PROJECT_ROOT, SETTINGS_ENTRY_POINT_GROUP, all_settings_classes

    declared = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["entry-points"]
    modules = {value.split(":")[0] for value in declared[SETTINGS_ENTRY_POINT_GROUP].values()}
    assert modules == {cls.__module__ for cls in all_settings_classes()}
    # One variable of each component's own section, so a dropped registration fails here.
    for name in (
        "STREAMREC_FEATURES__REPO_DIR",
        "STREAMREC_STREAMS__APP_ID",
        "STREAMREC_JOINER__APP_ID",
        "STREAMREC_TRAINER__INTERVAL_S",
        "STREAMREC_MODEL_SERVER__PORT",
        "STREAMREC_API__PORT",
        "STREAMREC_EVALUATOR__GROUP_ID",
        "STREAMREC_STACK__KAFKA_PORT",
    ):
        assert name in known_env_names(), name


def test_the_core_names_no_component() -> None:
    """The settings loader reads the registry; it never imports a component by name."""
    from streamrec.core import settings as core_settings

    source = Path(core_settings.__file__).read_text()
    for component in ("features.", "streams.", "online_trainer.", "serving.", "streamrec.ops"):
        assert f'"{component}' not in source, component
