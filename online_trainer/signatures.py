"""The exported signatures' inputs and outputs, from one table per schema.

``streamrec.core.contracts`` documents the signatures; :func:`contract_signatures` is that
documentation as data for a given :class:`~streamrec.core.attributes.AttributeSchema`: the export
builds its ``tf.TensorSpec``\\ s from it (:func:`recommend_specs`, :func:`score_specs`,
:func:`similar_specs`) and the gate compares a loaded SavedModel against it, so the two cannot
drift apart. A spec is ``(dtype name, shape)`` with ``None`` where the contract says B, E, M or N.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from streamrec.core import contracts
from streamrec.core.attributes import AttributeSchema, InputKind, user_model_inputs

if TYPE_CHECKING:
    import tensorflow as tf

Spec = dict[str, tuple[str, tuple[int | None, ...]]]

_KIND_SPECS: dict[InputKind, tuple[str, tuple[int | None, ...]]] = {
    "string": ("string", (None,)),
    "strings": ("string", (None, None)),
    "int": ("int64", (None,)),
    "float": ("float32", (None,)),
}
_TOP_K: Spec = {
    "item_ids": ("string", (None, contracts.TOP_K_EXPORTED)),
    "scores": ("float32", (None, contracts.TOP_K_EXPORTED)),
}
_LIST = ("string", (None, None))


def user_spec(schema: AttributeSchema) -> Spec:
    """The user inputs of ``recommend`` and ``score`` (``user_model_inputs``)."""
    spec = {name: _KIND_SPECS[kind] for name, kind in user_model_inputs(schema).items()}
    spec["recent_items"] = ("string", (None, contracts.RECENT_ITEMS_MAX))
    return spec


def contract_signatures(schema: AttributeSchema) -> dict[str, tuple[Spec, Spec]]:
    """signature name -> (inputs, outputs), as ``streamrec.core.contracts`` documents them."""
    users = user_spec(schema)
    recommend = ({**users, "exclude_items": _LIST}, dict(_TOP_K))
    return {
        contracts.RECOMMEND_SIGNATURE: recommend,
        "serving_default": recommend,
        contracts.SCORE_SIGNATURE: ({**users, "item_ids": _LIST}, {"scores": ("float32", (None, None))}),
        contracts.SIMILAR_SIGNATURE: ({"item_id": ("string", (None,)), "exclude_items": _LIST}, dict(_TOP_K)),
    }


def tensor_specs(spec: Spec) -> dict[str, tf.TensorSpec]:
    import tensorflow as tf

    return {name: tf.TensorSpec(list(shape), tf.as_dtype(dtype), name=name) for name, (dtype, shape) in spec.items()}


def recommend_specs(schema: AttributeSchema) -> dict[str, tf.TensorSpec]:
    return tensor_specs(contract_signatures(schema)[contracts.RECOMMEND_SIGNATURE][0])


def score_specs(schema: AttributeSchema) -> dict[str, tf.TensorSpec]:
    return tensor_specs(contract_signatures(schema)[contracts.SCORE_SIGNATURE][0])


def similar_specs() -> dict[str, tf.TensorSpec]:
    return tensor_specs(contract_signatures(AttributeSchema())[contracts.SIMILAR_SIGNATURE][0])


def spec_mismatches(kind: str, actual: dict[str, Any], expected: Spec) -> list[str]:
    """Names, dtypes and shapes of a signature's ``actual`` specs that differ from ``expected``
    (``None`` dims allowed where the contract says B/E/N)."""
    problems: list[str] = []
    if set(actual) != set(expected):
        missing, extra = sorted(set(expected) - set(actual)), sorted(set(actual) - set(expected))
        problems.append(f"{kind} names differ (missing {missing}, unexpected {extra})")
    for name in sorted(set(actual) & set(expected)):
        dtype, shape = expected[name]
        spec = actual[name]
        got_shape = tuple(spec.shape.as_list()) if spec.shape.rank is not None else None
        if spec.dtype.name != dtype:
            problems.append(f"{kind} {name!r} has dtype {spec.dtype.name}, expected {dtype}")
        if got_shape is None or len(got_shape) != len(shape):
            problems.append(f"{kind} {name!r} has shape {got_shape}, expected {shape}")
        elif any(want is not None and got not in (want, None) for got, want in zip(got_shape, shape, strict=True)):
            problems.append(f"{kind} {name!r} has shape {got_shape}, expected {shape}")
    return problems


def signatures_problems(loaded: Any, expected: dict[str, tuple[Spec, Spec]]) -> list[str]:
    """Every difference between a loaded SavedModel's signatures and ``expected`` (signature name
    -> (inputs, outputs)): a missing signature, positional inputs, names, dtypes and shapes."""
    problems: list[str] = []
    for name, (inputs, outputs) in expected.items():
        if name not in loaded.signatures:
            problems.append(f"signature {name!r} is missing (has {sorted(loaded.signatures)})")
            continue
        function = loaded.signatures[name]
        args, kwargs = function.structured_input_signature
        if args:
            problems.append(f"{name}: takes positional inputs {args}; the contract passes named inputs only")
        problems += [f"{name}: {p}" for p in spec_mismatches("input", dict(kwargs), inputs)]
        problems += [f"{name}: {p}" for p in spec_mismatches("output", dict(function.structured_outputs), outputs)]
    return problems
