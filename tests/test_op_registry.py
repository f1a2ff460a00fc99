"""One place per integer op: every node type has its rules in one op module and an emitter in every backend's table,
and every float node the capture makes has an op that builds it."""
from __future__ import annotations

import dataclasses
import typing

import pytest

from pipeline.export import onnx_model
from pipeline.export.c_ops import C_EMITTERS
from pipeline.graph import nodes as float_nodes
from pipeline.quant.ops import registry
from pipeline.quant.ops.base import IntegerOp

BACKENDS = {
    "C": C_EMITTERS,
    "integer ONNX": onnx_model.INTEGER_EMITTERS,
    "QLinear ONNX": onnx_model.QLINEAR_EMITTERS,
}


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_every_backend_has_an_emitter_for_every_node_type_and_no_other(backend):
    table = BACKENDS[backend]
    assert set(table) == set(registry.OP_OF), (
        f"{backend}: missing {sorted(t.__name__ for t in set(registry.OP_OF) - set(table))}, "
        f"unknown {sorted(t.__name__ for t in set(table) - set(registry.OP_OF))}"
    )


def test_every_op_is_complete_and_its_node_type_is_a_frozen_dataclass_with_name_and_output():
    for op in registry.OPS:
        assert isinstance(op, IntegerOp)
        assert all(callable(getattr(op, rule)) for rule in ("build", "output_shape", "prepare", "run", "simulate"))
        assert dataclasses.is_dataclass(op.node_type) and op.node_type.__dataclass_params__.frozen
        fields = {field.name for field in dataclasses.fields(op.node_type)}
        assert {"name", "output"} <= fields and ("input" in fields) != ("inputs" in fields), op.node_type
    assert len(registry.NODE_TYPES) == len(registry.OPS)  # one op per node type name


def test_every_float_node_type_is_built_by_exactly_one_op():
    float_types = set(typing.get_args(float_nodes.Node))
    built = [float_type for op in registry.OPS for float_type in op.float_types]
    assert sorted(built, key=lambda t: t.__name__) == sorted(float_types, key=lambda t: t.__name__)


def test_the_node_union_is_the_registry():
    assert set(typing.get_args(registry.IntNode)) == set(registry.OP_OF)
