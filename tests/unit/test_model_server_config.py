"""models.config parsing and validation, the version policy, input checks and the label rule."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from serving.model_server.core import CoreOptions, ServerCore
from serving.model_server.manager import ModelManager
from serving.model_server.versions import Signature, check_inputs, to_eager_tensor
from serving.protocol.errors import FailedPrecondition, InvalidArgument
from serving.protocol.models_config import parse_config, read_config, single_model_config, write_config

CONFIG = """
model_config_list {
  config {
    name: "streamrec"
    base_path: "/models/streamrec"
    model_platform: "tensorflow"
    model_version_policy { specific { versions: 3 versions: 5 } }
    version_labels { key: "stable" value: 3 }
    version_labels { key: "canary" value: 5 }
  }
}
"""


def test_parse_and_atomic_write_round_trip(tmp_path: Path) -> None:
    config = parse_config(CONFIG)
    model = config.model_config_list.config[0]
    assert list(model.model_version_policy.specific.versions) == [3, 5]
    assert dict(model.version_labels) == {"stable": 3, "canary": 5}
    path = tmp_path / "models" / "models.config"
    write_config(path, config)
    assert read_config(path) == config
    assert [p.name for p in path.parent.iterdir()] == ["models.config"]  # no temp file left behind


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("model_config_list { config { name: 'a' base_path: '/a' nonsense: 1 } }", "not a ModelServerConfig"),
        ("model_config_list { config { name: 'a' base_path: '/a' } config { name: 'a' base_path: '/b' } }",
         "multiple times"),
        ("model_config_list { config { name: 'a' } }", "no base_path"),
        ("model_config_list { config { name: 'a' base_path: '/a' model_platform: 'pytorch' } }", "not supported"),
        ("custom_model_config { }", "Only ModelConfigList"),
    ],
)  # fmt: skip
def test_bad_configs_are_rejected_naming_the_problem(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        parse_config(text)


def _manager(tmp_path: Path, policy_text: str) -> ModelManager:
    config = parse_config(
        f"model_config_list {{ config {{ name: 'm' base_path: '{tmp_path}' model_platform: 'tensorflow' "
        f"{policy_text} }} }}"
    )
    pool = ThreadPoolExecutor(1)
    return ModelManager(config.model_config_list.config[0], load_executor=pool, unload_executor=pool)


@pytest.mark.parametrize(
    ("policy", "aspired"),
    [
        ("", {12}),
        ("model_version_policy { latest { num_versions: 2 } }", {7, 12}),
        ("model_version_policy { all { } }", {1, 7, 12}),
        ("model_version_policy { specific { versions: 1 versions: 99 } }", {1}),
    ],
)
def test_version_policy_picks_from_all_digit_directories(tmp_path: Path, policy: str, aspired: set[int]) -> None:
    for name in ("1", "7", "12", ".tmp-13-abc", "notes", "0x1"):
        (tmp_path / name).mkdir()
    (tmp_path / "20").write_text("a file, not a version")
    manager = _manager(tmp_path, policy)
    on_disk = manager.list_versions()
    assert on_disk is not None and set(on_disk) == {1, 7, 12}
    assert manager.aspired_versions(on_disk) == aspired


def test_unlistable_base_path_keeps_the_previous_versions(tmp_path: Path) -> None:
    manager = _manager(tmp_path / "missing", "")
    assert manager.list_versions() is None


def test_labels_on_unloaded_versions_are_refused_unless_new_and_allowed(tmp_path: Path) -> None:
    config = single_model_config("m", str(tmp_path))
    config.model_config_list.config[0].version_labels["stable"] = 4
    strict = ServerCore(CoreOptions())
    with pytest.raises(FailedPrecondition, match="version 4 of model m, which is not currently available"):
        strict.reload_config(config)
    assert strict.manager("m") is None  # nothing was applied
    lenient = ServerCore(CoreOptions(allow_version_labels_for_unavailable_models=True))
    lenient.reload_config(config)
    assert lenient.manager("m") is not None
    config.model_config_list.config[0].version_labels["stable"] = 5  # moving an existing label: refused
    with pytest.raises(FailedPrecondition):
        lenient.reload_config(config)
    strict.stop()
    lenient.stop()


def test_input_checks_name_extra_missing_dtype_and_shape() -> None:
    signature = Signature(
        function=None,
        inputs={"ids": tf.TensorSpec([None, 3], tf.string), "n": tf.TensorSpec([None], tf.int64)},
        outputs=("scores",),
    )
    check_inputs(signature, {"ids": np.array([["a", "b", "c"]], dtype=object), "n": np.array([1])})
    with pytest.raises(InvalidArgument, match=r"Sent extra: \{x\}. Missing but required: \{n\}"):
        check_inputs(signature, {"ids": np.array([["a", "b", "c"]], dtype=object), "x": np.array([1])})
    with pytest.raises(InvalidArgument, match="expects int64 but float32"):
        check_inputs(signature, {"ids": np.array([["a", "b", "c"]], dtype=object), "n": np.array([1.0], np.float32)})
    with pytest.raises(InvalidArgument, match="shape"):
        check_inputs(signature, {"ids": np.array([["a"]], dtype=object), "n": np.array([1])})
    with pytest.raises(InvalidArgument, match=r"shape \[3\] is not compatible with \(None, 3\)"):
        check_inputs(signature, {"ids": np.array(["a", "b", "c"], dtype=object), "n": np.array([1])})
    with pytest.raises(InvalidArgument, match=r"'n': shape \[1, 1\]"):
        check_inputs(signature, {"ids": np.array([["a", "b", "c"]], dtype=object), "n": np.array([[1]])})


def test_unknown_rank_accepts_any_shape_and_tensors_match_tf_constant() -> None:
    signature = Signature(
        function=None,
        inputs={"ids": tf.TensorSpec(None, tf.string), "n": tf.TensorSpec([2], tf.int64)},
        outputs=("scores",),
    )
    ids = np.array([[b"a"], [b"b"]], dtype=object)
    n = np.array([4, 5], dtype=np.int64)
    check_inputs(signature, {"ids": ids, "n": n})
    for alias, value in (("ids", ids), ("n", n)):
        converted = to_eager_tensor(value, signature.checks[alias].dtype_enum)
        expected = tf.constant(value, dtype=signature.inputs[alias].dtype)
        assert converted.dtype == expected.dtype
        assert converted.shape == expected.shape
        assert converted.numpy().tolist() == expected.numpy().tolist()
