"""Request validation, arm assignment, settings and the generated code of the recommendation API."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from pydantic import ValidationError

from serving.api import proto
from serving.api.arms import CanaryGate, assign_arm, bucket
from serving.api.errors import InvalidRequest
from serving.api.settings import ApiSection, ApiSettings
from serving.api.validation import validate, validate_similar

pb2 = proto.generated().pb2
LIMITS = ApiSection(
    max_k=20,
    default_k=5,
    max_request_bytes=256,
    max_user_id_chars=32,
    max_item_id_chars=8,
    max_exclude_items=3,
    max_candidate_items=4,
)


def test_generated_code_matches_the_proto_and_rewrites_the_colliding_import() -> None:
    digest = hashlib.sha256((proto.PROTO_ROOT / proto.PROTO_FILE).read_bytes()).hexdigest()
    assert (proto.GENERATED_DIR / ".proto.sha256").read_text().strip() == digest
    service_source = (proto.GENERATED_DIR / "streamrec/v1/recommender_pb2_grpc.py").read_text()
    assert "from streamrec.v1 import" not in service_source  # would shadow the project's package
    service = pb2.DESCRIPTOR.services_by_name["Recommender"]
    assert service.full_name == proto.SERVICE_NAME
    assert sorted(method.name for method in service.methods) == ["Recommend", "SimilarItems"]
    assert proto.ensure_generated() == proto.GENERATED_DIR  # up to date: a no-op


def test_concurrent_processes_generate_one_complete_set_and_a_changed_proto_regenerates(tmp_path: Path) -> None:
    target = tmp_path / "generated"
    script = f"import pathlib, serving.api.proto as p; p.ensure_generated(pathlib.Path({str(target)!r}))"
    workers = [subprocess.Popen([sys.executable, "-c", script], cwd=proto.SERVING_DIR.parent) for _ in range(4)]
    assert [worker.wait(timeout=60) for worker in workers] == [0, 0, 0, 0]
    files = sorted(path.relative_to(target).as_posix() for path in target.rglob("*.py"))
    assert files == [
        "__init__.py",
        "streamrec/__init__.py",
        "streamrec/v1/__init__.py",
        "streamrec/v1/recommender_pb2.py",
        "streamrec/v1/recommender_pb2_grpc.py",
    ]
    assert not list(target.glob(".tmp-*"))  # every temp folder was removed
    stamp = target / ".proto.sha256"
    stamp.write_text("digest of an older .proto\n")
    (target / "streamrec/v1/recommender_pb2.py").write_text("stale = True\n")
    proto.ensure_generated(target)  # in this process, where TensorFlow is usually loaded already
    assert stamp.read_text().strip() == hashlib.sha256((proto.PROTO_ROOT / proto.PROTO_FILE).read_bytes()).hexdigest()
    assert "stale = True" not in (target / "streamrec/v1/recommender_pb2.py").read_text()


def test_a_valid_request_keeps_its_values_and_k_zero_means_the_default() -> None:
    request = pb2.RecommendRequest(user_id=" 42 ", k=0, exclude_seen=True, context={"surface": "home"})
    valid = validate(request, LIMITS)
    assert (valid.user_id, valid.k, valid.exclude_seen, valid.context) == ("42", 5, True, {"surface": "home"})
    assert validate(pb2.RecommendRequest(user_id="7", k=20), LIMITS).k == 20


@pytest.mark.parametrize(
    ("request_fields", "message"),
    [
        ({"user_id": "", "k": 3}, "user_id is empty"),
        ({"user_id": "   ", "k": 3}, "user_id is empty"),
        ({"user_id": "u", "k": -1}, "k must be positive"),
        ({"user_id": "u", "k": 21}, "k must be at most 20"),
        ({"user_id": "u" * 33, "k": 3}, "above the limit of 32"),
        ({"user_id": "u", "k": 3, "context": {"blob": "x" * 300}}, "bytes, above the limit of 256"),
    ],
)
def test_invalid_requests_are_refused_with_a_reason(request_fields: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        validate(pb2.RecommendRequest(**request_fields), LIMITS)


def test_item_id_lists_are_stripped_and_deduplicated_in_order_and_no_candidates_means_the_catalog() -> None:
    request = pb2.RecommendRequest(
        user_id="u", exclude_item_ids=["b", " a ", "b"], candidate_item_ids=["c2", "c1", "c2", "c3"]
    )
    valid = validate(request, LIMITS)
    assert valid.exclude_item_ids == ("b", "a")
    assert valid.candidate_item_ids == ("c2", "c1", "c3")
    unrestricted = validate(pb2.RecommendRequest(user_id="u"), LIMITS)
    assert (unrestricted.exclude_item_ids, unrestricted.candidate_item_ids) == ((), None)


@pytest.mark.parametrize(
    ("request_fields", "message"),
    [
        ({"user_id": "u", "exclude_item_ids": ["a", ""]}, r"exclude_item_ids\[1\] is empty"),
        ({"user_id": "u", "exclude_item_ids": [" "]}, r"exclude_item_ids\[0\] is empty"),
        (
            {"user_id": "u", "exclude_item_ids": ["a", "b", "c", "d"]},
            "exclude_item_ids has 4 ids, above the limit of 3",
        ),
        ({"user_id": "u", "candidate_item_ids": [""]}, r"candidate_item_ids\[0\] is empty"),
        ({"user_id": "u", "candidate_item_ids": list("abcde")}, "candidate_item_ids has 5 ids, above the limit of 4"),
        ({"user_id": "u", "candidate_item_ids": ["x" * 9]}, "9 characters, above the limit of 8"),
    ],
)
def test_bad_item_id_lists_are_refused_with_the_position_and_the_fix(
    request_fields: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidRequest, match=message):
        validate(pb2.RecommendRequest(**request_fields), LIMITS)


def test_a_valid_similar_items_request_keeps_its_values_and_k_zero_means_the_default() -> None:
    valid = validate_similar(pb2.SimilarItemsRequest(item_id=" m1 ", exclude_item_ids=["m2", "m2"]), LIMITS)
    assert (valid.item_id, valid.k, valid.exclude_item_ids) == ("m1", 5, ("m2",))


@pytest.mark.parametrize(
    ("request_fields", "message"),
    [
        ({"item_id": ""}, "item_id is empty"),
        ({"item_id": "  "}, "item_id is empty"),
        ({"item_id": "x" * 9}, "item_id has 9 characters, above the limit of 8"),
        ({"item_id": "m1", "k": -1}, "k must be positive"),
        ({"item_id": "m1", "k": 21}, "k must be at most 20"),
        ({"item_id": "m1", "exclude_item_ids": ["a", ""]}, r"exclude_item_ids\[1\] is empty"),
        ({"item_id": "m1", "exclude_item_ids": list("abcd")}, "above the limit of 3"),
        ({"item_id": "m1", "exclude_item_ids": ["x" * 8] * 3 + ["y" * 300]}, "bytes, above the limit of 256"),
    ],
)
def test_invalid_similar_items_requests_are_refused_with_a_reason(
    request_fields: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidRequest, match=message):
        validate_similar(pb2.SimilarItemsRequest(**request_fields), LIMITS)


def test_an_arm_is_stable_per_user_and_the_split_follows_the_share() -> None:
    users = [f"user-{i}" for i in range(20_000)]
    arms = [assign_arm("salt-a", user, 0.2) for user in users]
    assert arms == [assign_arm("salt-a", user, 0.2) for user in users]  # same user, same arm
    share = Counter(arms)["canary"] / len(users)
    assert 0.19 < share < 0.21  # binomial sd is 0.0028
    assert {assign_arm("salt-a", user, 0.0) for user in users} == {"stable"}
    assert {assign_arm("salt-a", user, 1.0) for user in users} == {"canary"}


def test_growing_the_share_only_moves_users_into_canary_and_a_new_salt_reshuffles() -> None:
    users = [str(i) for i in range(5_000)]
    small = {user for user in users if assign_arm("s", user, 0.1) == "canary"}
    large = {user for user in users if assign_arm("s", user, 0.3) == "canary"}
    assert small <= large
    other_salt = {user for user in users if assign_arm("t", user, 0.1) == "canary"}
    overlap = len(small & other_salt) / len(small)
    assert overlap < 0.2  # independent splits overlap by about the share (0.1)


def test_bucket_is_the_documented_hash() -> None:
    digest = hashlib.sha256(b"salt:42").digest()
    assert bucket("salt", "42") == int.from_bytes(digest[:8], "big") / 2**64


def test_canary_gate_skips_the_canary_for_the_recheck_period() -> None:
    now = [100.0]
    gate = CanaryGate(recheck_s=5.0, clock=lambda: now[0])
    assert gate.canary_available()
    gate.mark_missing()
    now[0] = 104.9
    assert not gate.canary_available()
    now[0] = 105.0
    assert gate.canary_available()


def test_settings_refuse_a_default_k_above_max_k_and_out_of_range_shares() -> None:
    with pytest.raises(ValidationError, match="default_k"):
        ApiSection(max_k=5, default_k=10)
    with pytest.raises(ValidationError, match="canary_share"):
        ApiSection(canary_share=1.5)
    settings = ApiSettings()
    assert settings.model_budget_s == settings.model_server.request_timeout_ms / 1000
    assert settings.feature_max_age_s == settings.features.max_feature_age_s
