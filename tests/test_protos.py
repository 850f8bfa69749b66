"""The protocol definitions: the committed specserve.v1 modules up to date, its domain messages,
and the KServe v2 protocol taken from Triton's own compiled protos (:mod:`specserve.protos.kserve`),
so that tritonclient and every specserve module load in one interpreter."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import grpc
import numpy as np

from specserve.protos import specserve_pb2 as pb
from specserve.protos import specserve_pb2_grpc as pb_grpc

PROTOS = Path(__file__).resolve().parents[1] / "protos"


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
    for stem in ("specserve",):
        text = (PROTOS / f"{stem}_pb2_grpc.py").read_text()
        assert f"from specserve.protos import {stem}_pb2 as" in text
        assert (PROTOS / f"{stem}_pb2.pyi").is_file()
    assert pb.DESCRIPTOR.name == "specserve/protos/specserve.proto"


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


# ------------------------------------------------------------------ KServe v2: Triton's own protos


def test_kserve_protos_are_tritons_own():
    from tritonclient.grpc import model_config_pb2, service_pb2

    from specserve.protos import kserve

    assert kserve.service_pb2 is service_pb2 and kserve.model_config_pb2 is model_config_pb2
    assert kserve.service_pb2.DESCRIPTOR.name == "grpc_service.proto"
    assert kserve.service_pb2.DESCRIPTOR.package == "inference"
    methods = {m.name for m in kserve.service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods}
    assert {"ModelInfer", "ModelStreamInfer", "ModelConfig", "ModelMetadata", "RepositoryIndex"} <= methods
    # no second copy of the inference.* symbols is left in the project
    assert not list(PROTOS.glob("grpc_service*")) and not list(PROTOS.glob("model_config*"))


def test_kserve_inputs_decode_and_each_bad_request_is_named():
    """ModelInfer's tensors: raw little-endian bytes read without a copy, typed contents, and
    every malformed request refused with InvalidInputError naming what is wrong."""
    import numpy as np
    import pytest

    from specserve.protos.kserve import service_pb2 as kserve
    from specserve.runtime.errors import InvalidInputError
    from specserve.runtime.serving.kserve import _decode_inputs

    flux = np.arange(6, dtype=np.float32).reshape(2, 3) / 7
    request = kserve.ModelInferRequest(model_name="rbm")
    request.inputs.add(name="flux", datatype="FP32", shape=[2, 3])
    request.inputs.add(name="n_samples", datatype="INT64", shape=[1])
    request.raw_input_contents.extend([flux.astype("<f4").tobytes(), np.array([5], "<i8").tobytes()])
    got = _decode_inputs(request)
    np.testing.assert_array_equal(got["flux"], flux)
    assert got["flux"].dtype == np.float32 and got["flux"].shape == (2, 3) and not got["flux"].flags.writeable
    assert got["n_samples"].dtype == np.int64 and got["n_samples"].tolist() == [5]

    typed = kserve.ModelInferRequest(model_name="rbm")
    tensor = typed.inputs.add(name="flux", datatype="FP32", shape=[2, 3])
    tensor.contents.fp32_contents.extend(flux.reshape(-1).tolist())
    np.testing.assert_array_equal(_decode_inputs(typed)["flux"], flux)

    def bad(edit, message: str) -> None:
        broken = kserve.ModelInferRequest()
        broken.CopyFrom(request)
        edit(broken)
        with pytest.raises(InvalidInputError, match=message):
            _decode_inputs(broken)

    bad(lambda r: r.raw_input_contents.pop(), "1 raw_input_contents for 2 inputs")
    bad(lambda r: r.inputs[0].contents.fp32_contents.append(1.0), "contents must not be given with raw")
    bad(lambda r: r.inputs[0].shape.__setitem__(0, -2), "negative dimension")
    bad(lambda r: r.inputs[0].shape.__setitem__(0, 3), r"input 'flux': 24 bytes for shape \[3, 3\] of FP32 \(expected 36\)")
    bad(lambda r: setattr(r.inputs[0], "datatype", "FP128"), "input 'flux': unsupported KServe datatype 'FP128'")
    tensor.contents.fp32_contents.append(0.5)
    with pytest.raises(InvalidInputError, match=r"input 'flux': 7 values for shape \[2, 3\]"):
        _decode_inputs(typed)
    typed.inputs[0].datatype = "FP16"
    with pytest.raises(InvalidInputError, match="FP16 must be sent in raw_input_contents"):
        _decode_inputs(typed)
