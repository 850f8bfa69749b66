"""The protocol definitions in protos/: committed modules up to date, the specserve.v1 domain
messages, and the KServe v2 protocol checked against tritonclient's compiled copy.

tritonclient's `service_pb2` and our `grpc_service_pb2` define the same message names
(`inference.*`) under different file names, so the two cannot be imported into one interpreter
(the second import fails with "duplicate symbol"). Everything that touches either module runs in
a subprocess; this process (shared with test_server.py, which imports tritonclient) imports
neither. Subprocesses exchange serialized descriptors and messages as base64/JSON.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pb2

from specserve.protos import specserve_pb2 as pb
from specserve.protos import specserve_pb2_grpc as pb_grpc

PROTOS = Path(__file__).resolve().parents[1] / "protos"

OMITTED_MESSAGES = {"ModelConfigRequest", "ModelConfigResponse"}
OMITTED_RPCS = {"ModelConfig"}

# Runs in a subprocess with one implementation of the KServe protocol: "ours" or "triton".
# Reads a JSON list of operations on stdin, prints a JSON list of results.
WORKER = textwrap.dedent('''
    import base64, json, sys
    from google.protobuf import descriptor_pb2, json_format

    side = sys.argv[1]
    if side == "ours":
        from specserve.protos import grpc_service_pb2 as kserve
    else:
        from tritonclient.grpc import service_pb2 as kserve

    def b64(data):
        return base64.b64encode(data).decode()

    def as_dict(message):
        return json_format.MessageToDict(message, preserving_proto_field_name=True)

    def example_infer_request():
        request = kserve.ModelInferRequest(model_name="rbm", model_version="3", id="req-7")
        request.parameters["sequence_id"].int64_param = -42
        request.parameters["priority"].uint64_param = 2**63 + 5
        request.parameters["binary_data_output"].bool_param = True
        request.parameters["tag"].string_param = "survey/plate 1234"
        request.parameters["temperature"].double_param = 0.25
        flux = request.inputs.add(name="flux", datatype="FP32", shape=[2, 3])
        flux.parameters["binary_data_size"].int64_param = 24
        request.inputs.add(name="ids", datatype="INT64", shape=[2])
        request.raw_input_contents.append(bytes(range(24)))
        request.raw_input_contents.append((7).to_bytes(8, "little") + (-1).to_bytes(8, "little", signed=True))
        request.outputs.add(name="probabilities").parameters["classification"].int64_param = 2
        request.outputs.add(name="free_energy")
        return request

    def tritonclient_request():
        # The request exactly as tritonclient's InferenceServerClient.infer() builds it.
        import numpy as np
        from tritonclient.grpc import InferInput, InferRequestedOutput
        from tritonclient.grpc._utils import _get_inference_request
        flux = InferInput("flux", [2, 3], "FP32")
        flux.set_data_from_numpy(np.arange(6, dtype=np.float32).reshape(2, 3))
        names = InferInput("names", [2], "BYTES")
        names.set_data_from_numpy(np.array([b"a", b"bc"], dtype=np.object_))
        return _get_inference_request(
            model_name="rbm", inputs=[flux, names], model_version="1", request_id="r1",
            outputs=[InferRequestedOutput("probabilities")], sequence_id=0, sequence_start=False,
            sequence_end=False, priority=3, timeout=None, parameters={"note": "x", "scale": 1.5})

    def run(op):
        kind = op["op"]
        if kind == "descriptor":
            proto = descriptor_pb2.FileDescriptorProto()
            kserve.DESCRIPTOR.CopyToProto(proto)
            return b64(proto.SerializeToString())
        if kind == "example_infer_request":
            message = example_infer_request()
        elif kind == "tritonclient_request":
            message = tritonclient_request()
        elif kind == "build":
            message = json_format.ParseDict(op["dict"], getattr(kserve, op["type"])())
        elif kind == "parse":
            message = getattr(kserve, op["type"]).FromString(base64.b64decode(op["data"]))
        else:
            raise ValueError(kind)
        return {"data": b64(message.SerializeToString(deterministic=True)), "dict": as_dict(message)}

    print(json.dumps([run(op) for op in json.load(sys.stdin)]))
''')


def kserve(side: str, *ops: dict) -> list:
    """Run ``ops`` in a fresh interpreter that imports only ``side``'s KServe module."""
    proc = subprocess.run([sys.executable, "-c", WORKER, side], input=json.dumps(ops),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def file_descriptor(side: str) -> descriptor_pb2.FileDescriptorProto:
    (data,) = kserve(side, {"op": "descriptor"})
    return descriptor_pb2.FileDescriptorProto.FromString(base64.b64decode(data))


@pytest.fixture(scope="module")
def descriptors() -> dict[str, descriptor_pb2.FileDescriptorProto]:
    return {side: file_descriptor(side) for side in ("ours", "triton")}


def _fields(message: descriptor_pb2.DescriptorProto) -> dict:
    """Every field (name, number, label, type, type name, oneof) and nested type, recursively."""
    oneofs = [o.name for o in message.oneof_decl]
    return {
        "fields": {
            f.number: (f.name, descriptor_pb2.FieldDescriptorProto.Label.Name(f.label),
                       descriptor_pb2.FieldDescriptorProto.Type.Name(f.type), f.type_name,
                       oneofs[f.oneof_index] if f.HasField("oneof_index") else None, f.proto3_optional)
            for f in message.field
        },
        "map_entry": message.options.map_entry,
        "nested": {n.name: _fields(n) for n in message.nested_type},
        "enums": {e.name: [(v.name, v.number) for v in e.value] for e in message.enum_type},
    }


def _methods(service: descriptor_pb2.ServiceDescriptorProto) -> dict:
    return {m.name: (m.input_type, m.output_type, m.client_streaming, m.server_streaming)
            for m in service.method}


# ------------------------------------------------------------------ generated modules


def test_generated_modules_are_up_to_date():
    proc = subprocess.run([sys.executable, "-m", "specserve.protos.generate", "--check"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_check_reports_changed_and_stale_files(tmp_path):
    for path in PROTOS.iterdir():
        if path.suffix in (".proto", ".py", ".pyi"):
            shutil.copy2(path, tmp_path / path.name)
    (tmp_path / "specserve_pb2.py").write_text("# edited by hand\n")
    (tmp_path / "old_pb2_grpc.py").write_text("")
    code = textwrap.dedent(f"""
        import json
        from pathlib import Path
        from specserve.protos.generate import check, generate
        first, second = Path({str(tmp_path / 'a')!r}), Path({str(tmp_path / 'b')!r})
        names = generate(first)
        generate(second)
        same = all((first / n).read_bytes() == (second / n).read_bytes() for n in names)
        print(json.dumps({{"differ": check(Path({str(tmp_path)!r})), "deterministic": same}}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result == {"differ": ["old_pb2_grpc.py", "specserve_pb2.py"], "deterministic": True}


def test_script_form_and_package_qualified_imports():
    proc = subprocess.run([sys.executable, str(PROTOS / "generate.py"), "--check"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for stem in ("grpc_service", "specserve"):
        text = (PROTOS / f"{stem}_pb2_grpc.py").read_text()
        assert f"from specserve.protos import {stem}_pb2 as" in text
        assert (PROTOS / f"{stem}_pb2.pyi").is_file()
    assert pb.DESCRIPTOR.name == "specserve/protos/specserve.proto"


def test_both_kserve_modules_in_one_interpreter_collide():
    """Documents why the server and tritonclient must live in different processes."""
    for first, second in (("tritonclient.grpc", "specserve.protos.grpc_service_pb2"),
                          ("specserve.protos.grpc_service_pb2", "tritonclient.grpc")):
        proc = subprocess.run([sys.executable, "-c", f"import {first}; import {second}"],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0
        assert "duplicate symbol 'inference." in proc.stderr or "already defined" in proc.stderr


# ------------------------------------------------------------------ specserve.v1


def _spectrum(**kwargs) -> pb.Spectrum:
    return pb.Spectrum(id="LAMOST-1", flux=[1.0, 0.5, 2.0], ivar=[4.0, 0.0, 1.0],
                       mask=[False, True, False], **kwargs)


def test_analyze_request_round_trip_explicit_wavelengths():
    spectrum = _spectrum(wavelength=pb.DoubleArray(values=[4000.0, 4000.5, 4001.0]),
                         metadata={"file": "spec-1.fits", "fibre": "17"})
    request = pb.AnalyzeRequest(request_id="batch-1", spectra=[spectrum], models=["cv", "giants"],
                                mc_samples=32, return_model_spectrum=True)
    back = pb.AnalyzeRequest.FromString(request.SerializeToString())
    assert back == request
    (s,) = back.spectra
    assert s.WhichOneof("wavelengths") == "wavelength"
    assert list(s.wavelength.values) == [4000.0, 4000.5, 4001.0]
    assert list(s.flux) == [1.0, 0.5, 2.0] and list(s.ivar) == [4.0, 0.0, 1.0]
    assert list(s.mask) == [False, True, False]
    assert dict(s.metadata) == {"file": "spec-1.fits", "fibre": "17"}
    assert not s.HasField("redshift")
    assert list(back.models) == ["cv", "giants"] and back.mc_samples == 32 and back.return_model_spectrum


def test_analyze_request_round_trip_log_linear_grid_and_redshift():
    spectrum = _spectrum(grid=pb.LogLinearGrid(start=3.5682, step=1e-4, length=3), redshift=0.0)
    back = pb.AnalyzeRequest.FromString(pb.AnalyzeRequest(spectra=[spectrum]).SerializeToString())
    (s,) = back.spectra
    assert s.WhichOneof("wavelengths") == "grid"
    assert (s.grid.start, s.grid.step, s.grid.length) == (3.5682, 1e-4, 3)
    assert s.HasField("redshift") and s.redshift == 0.0  # present although zero
    s.ClearField("redshift")
    assert not s.HasField("redshift")
    s.wavelength.values.append(4000.0)  # the oneof switches
    assert s.WhichOneof("wavelengths") == "wavelength" and not s.HasField("grid")


def test_pixel_arrays_are_packed_on_the_wire():
    data = pb.Spectrum(flux=[1.0, 2.0, 3.0], ivar=[1.0, 1.0, 1.0]).SerializeToString()
    floats = np.array([1, 2, 3], dtype="<f4").tobytes()
    # one length-delimited record per array (tag, 12 bytes), not one tagged record per value
    assert data == bytes([4 << 3 | 2, 12]) + floats + bytes([5 << 3 | 2, 12]) + np.ones(3, "<f4").tobytes()


def test_results_and_in_band_errors_round_trip():
    result = pb.ModelResult(model="cv", version="1", applicable=True, values={"p_cv": 0.9, "free_energy_cv": -3.5},
                            class_names=["non_cv", "cv"], probabilities=[0.1, 0.9], model_spectrum=[1.0, 0.98])
    bad = pb.SpectrumResult(id="b", error=pb.Error(code=pb.Error.INVALID_ARGUMENT, message="empty flux"))
    response = pb.AnalyzeResponse(request_id="r", results=[pb.SpectrumResult(id="a", results=[result]), bad])
    back = pb.AnalyzeResponse.FromString(response.SerializeToString())
    assert back == response
    assert not back.results[0].HasField("error") and back.results[1].HasField("error")
    assert dict(back.results[0].results[0].values) == {"p_cv": 0.9, "free_energy_cv": -3.5}
    stream = pb.AnalyzeStreamResponse(request_id="8", error=pb.Error(code=pb.Error.NOT_FOUND, message="no model"))
    assert pb.AnalyzeStreamResponse.FromString(stream.SerializeToString()) == stream
    info = pb.ModelInfo(name="cv", version="1", ready=False, reason="bad file", metadata={"task": "classification"})
    listing = pb.ListModelsResponse(models=[info])
    assert pb.ListModelsResponse.FromString(listing.SerializeToString()) == listing


def test_error_codes_mirror_grpc_status_codes():
    names = [v.name for v in pb.Error.Code.DESCRIPTOR.values if v.name != "UNSPECIFIED"]
    assert {"INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "UNAVAILABLE",
            "INTERNAL"} <= set(names)
    for name in names:
        assert pb.Error.Code.Value(name) == grpc.StatusCode[name].value[0], name
    assert pb.Error.Code.Value("UNSPECIFIED") == 0


def test_domain_service_shape():
    service = pb.DESCRIPTOR.services_by_name["SpecServe"]
    assert service.full_name == "specserve.v1.SpecServe"
    shapes = {m.name: (m.input_type.name, m.output_type.name, m.client_streaming, m.server_streaming)
              for m in service.methods}
    assert shapes == {
        "Analyze": ("AnalyzeRequest", "AnalyzeResponse", False, False),
        "AnalyzeStream": ("AnalyzeRequest", "AnalyzeStreamResponse", True, True),
        "ListModels": ("ListModelsRequest", "ListModelsResponse", False, False),
    }
    assert hasattr(pb_grpc, "SpecServeStub") and hasattr(pb_grpc, "add_SpecServeServicer_to_server")


# ------------------------------------------------------------------ KServe v2 against tritonclient


def test_kserve_file_identity(descriptors):
    ours, triton = descriptors["ours"], descriptors["triton"]
    assert ours.name == "specserve/protos/grpc_service.proto"
    assert ours.package == triton.package == "inference"
    assert ours.syntax == triton.syntax == "proto3"
    assert list(ours.dependency) == []


def test_kserve_messages_match_tritonclient(descriptors):
    ours = {m.name: m for m in descriptors["ours"].message_type}
    triton = {m.name: m for m in descriptors["triton"].message_type}
    assert set(triton) - set(ours) == OMITTED_MESSAGES
    assert set(ours) <= set(triton)
    for name in ("ModelInferRequest", "ModelInferResponse", "ModelStreamInferResponse", "InferParameter",
                 "InferTensorContents", "ModelStatistics", "StatisticDuration", "InferStatistics"):
        assert ours[name].field, name
    for name, message in ours.items():
        assert _fields(message) == _fields(triton[name]), name


def test_kserve_service_matches_tritonclient(descriptors):
    (ours,) = descriptors["ours"].service
    (triton,) = descriptors["triton"].service
    assert ours.name == triton.name == "GRPCInferenceService"
    ours_methods, triton_methods = _methods(ours), _methods(triton)
    assert set(triton_methods) - set(ours_methods) == OMITTED_RPCS
    for name, shape in ours_methods.items():
        assert shape == triton_methods[name], name
    assert ours_methods["ModelStreamInfer"][2:] == (True, True)
    required = {"ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer",
                "ModelStreamInfer", "ModelStatistics", "RepositoryIndex", "RepositoryModelLoad",
                "RepositoryModelUnload"}
    assert required <= set(ours_methods)


def test_infer_request_built_by_us_parses_in_tritonclient():
    (built,) = kserve("ours", {"op": "example_infer_request"})
    (parsed,) = kserve("triton", {"op": "parse", "type": "ModelInferRequest", "data": built["data"]})
    assert parsed["dict"] == built["dict"]
    assert parsed["data"] == built["data"]  # re-encodes byte for byte: no unknown or dropped fields
    request = built["dict"]
    assert [i["name"] for i in request["inputs"]] == ["flux", "ids"]
    assert base64.b64decode(request["raw_input_contents"][0]) == bytes(range(24))
    assert request["parameters"]["priority"] == {"uint64_param": str(2**63 + 5)}
    assert request["parameters"]["temperature"] == {"double_param": 0.25}


def test_tritonclient_request_and_messages_parse_in_ours():
    response = {
        "model_name": "rbm", "model_version": "1", "id": "r1",
        "parameters": {"triton_final_response": {"bool_param": True}},
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": ["2", "2"],
                     "parameters": {"binary_data_size": {"int64_param": "16"}}},
                    {"name": "labels", "datatype": "INT32", "shape": ["2"],
                     "contents": {"int_contents": [0, 1]}}],
        "raw_output_contents": [base64.b64encode(bytes(16)).decode()],
    }
    cases = [
        ("ModelInferRequest", {"op": "tritonclient_request"}),
        ("ModelInferResponse", {"op": "build", "type": "ModelInferResponse", "dict": response}),
        ("ModelStreamInferResponse", {"op": "build", "type": "ModelStreamInferResponse",
                                      "dict": {"error_message": "", "infer_response": response}}),
        ("ModelStreamInferResponse", {"op": "build", "type": "ModelStreamInferResponse",
                                      "dict": {"error_message": "model 'x' is not ready"}}),
        ("ModelStatisticsResponse", {"op": "build", "type": "ModelStatisticsResponse", "dict": {"model_stats": [{
            "name": "rbm", "version": "1", "last_inference": "1700000000000", "inference_count": "64",
            "execution_count": "2",
            "inference_stats": {"success": {"count": "2", "ns": "12345"}, "queue": {"count": "2", "ns": "10"}},
            "batch_stats": [{"batch_size": "32", "compute_infer": {"count": "2", "ns": "9000"}}]}]}}),
        ("RepositoryIndexResponse", {"op": "build", "type": "RepositoryIndexResponse", "dict": {"models": [
            {"name": "rbm", "version": "1", "state": "READY"},
            {"name": "broken", "version": "1", "state": "UNAVAILABLE", "reason": "bad file"}]}}),
    ]
    built = kserve("triton", *(op for _, op in cases))
    parsed = kserve("ours", *({"op": "parse", "type": name, "data": b["data"]}
                              for (name, _), b in zip(cases, built)))
    for (name, _), b, p in zip(cases, built, parsed):
        assert p["dict"] == b["dict"], name
        assert p["data"] == b["data"], name
    request = parsed[0]["dict"]
    assert [(i["name"], i["datatype"], i["shape"]) for i in request["inputs"]] == [
        ("flux", "FP32", ["2", "3"]), ("names", "BYTES", ["2"])]
    raw = [base64.b64decode(r) for r in request["raw_input_contents"]]
    assert raw[0] == np.arange(6, dtype="<f4").tobytes()
    assert raw[1] == b"\x01\x00\x00\x00a\x02\x00\x00\x00bc"
    assert request["parameters"]["priority"] == {"uint64_param": "3"}
    assert request["parameters"]["scale"] == {"double_param": 1.5}
