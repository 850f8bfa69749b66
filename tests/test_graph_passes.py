"""Graph rewrites applied at export: the same values, fewer slow kernels."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from specserve.export.onnx_export import decompose_softmax


def _softmax_model(axis: int, opset: int) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3, 5, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 3, 5, 4])
    graph = helper.make_graph([helper.make_node("Softmax", ["x"], ["y"], name="sm", axis=axis)], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("opset", [17, 18])
@pytest.mark.parametrize("axis", [-2, -3])
def test_softmax_over_an_inner_axis_becomes_reductions_with_the_same_values(axis, opset):
    model = _softmax_model(axis, opset)
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((6, 3, 5, 4)) * 30).astype(np.float32)  # large logits: the max shift matters
    before = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert decompose_softmax(model) == 1
    onnx.checker.check_model(model, full_check=True)
    ops = [n.op_type for n in model.graph.node]
    assert "Softmax" not in ops and {"ReduceMax", "ReduceSum", "Exp", "Div"} <= set(ops)
    after = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(after.sum(axis=axis), 1.0, rtol=1e-5)


def test_softmax_over_the_last_axis_is_left_alone():
    model = _softmax_model(-1, 17)
    assert decompose_softmax(model) == 0 and [n.op_type for n in model.graph.node] == ["Softmax"]


def test_rewriting_the_shipped_spt_keeps_its_outputs_and_catches_a_wrong_rewrite(tmp_path, monkeypatch):
    """The shipped SPT (its run is not kept) rewritten in place of export: same outputs with MC
    dropout off on both sides; a rewrite over the wrong axis is refused."""
    from specserve.export import onnx_export
    from specserve.runtime.defaults import SHIPPED
    from specserve.runtime.errors import ExportError

    src = SHIPPED / "spt" / "1" / "model.onnx"
    if not any(n.op_type == "Softmax" for n in onnx.load(str(src)).graph.node):
        src = tmp_path / "with_softmax.onnx"  # already rewritten: put the Softmax back to test the pass
        model = onnx.load(str(SHIPPED / "spt" / "1" / "model.onnx"))
        _restore_softmax(model)
        onnx.save(model, str(src))
    assert onnx_export.rewrite_exported(src, tmp_path / "new.onnx") == 2
    assert "Softmax" not in {n.op_type for n in onnx.load(str(tmp_path / "new.onnx")).graph.node}

    real = onnx_export.decompose_softmax

    def wrong_axis(model):
        count = real(model)
        for init in model.graph.initializer:
            if init.name.endswith("/axes"):
                init.CopyFrom(onnx.numpy_helper.from_array(np.array([-1], np.int64), init.name))
        return count

    monkeypatch.setattr(onnx_export, "decompose_softmax", wrong_axis)
    with pytest.raises(ExportError, match="rewritten graph"):
        onnx_export.rewrite_exported(src, tmp_path / "bad.onnx")
    assert not (tmp_path / "bad.onnx").exists()


def _restore_softmax(model: onnx.ModelProto) -> None:
    """Undo :func:`decompose_softmax` (ReduceMax ... Div back to one Softmax over the same axis)."""
    nodes, skip = [], set()
    by_name = {n.name: n for n in model.graph.node}
    axes = {i.name: int(onnx.numpy_helper.to_array(i)[0]) for i in model.graph.initializer if i.name.endswith("/axes")}
    for node in model.graph.node:
        if node.name.endswith("/ReduceMax"):
            base = node.name[: -len("/ReduceMax")]
            div = by_name[f"{base}/Div"]
            nodes.append(helper.make_node("Softmax", [node.input[0]], [div.output[0]], name=base, axis=axes[f"{base}/axes"]))
            skip |= {f"{base}/Sub", f"{base}/Exp", f"{base}/ReduceSum", f"{base}/Div"}
        elif node.name not in skip:
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    kept = [i for i in model.graph.initializer if not i.name.endswith("/axes")]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
