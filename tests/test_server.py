"""A real server process on a real port: KServe v2 through tritonclient, the domain API through
the specserve client and raw stubs, health, reflection, status codes, and `specserve analyze`.

The server runs in a subprocess, as users run it; the KServe servicer is built on tritonclient's
own compiled protos, so one interpreter can also hold both (the last test does).
"""

from __future__ import annotations

import os
import queue
import signal
import time
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from conftest import toy_rbm_repository

from specserve.protos import specserve_pb2 as pb
from specserve.protos import specserve_pb2_grpc as pb_grpc
from specserve.runtime.client import Client
from specserve.runtime.contract import fill_masked
from specserve.runtime.io import read_spectra
from specserve.runtime.preprocess import OPTICAL_PREPROCESSING
from specserve.runtime.wire import to_proto

SPECSERVE = str(Path(sys.executable).with_name("specserve"))


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo, onnx_path = toy_rbm_repository(tmp_path_factory.mktemp("server"))
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "1" / "model.onnx").write_bytes(b"junk")
    return repo, onnx_path


@pytest.fixture(scope="module")
def server(repo):
    proc = subprocess.Popen([SPECSERVE, "serve", "--repository", str(repo[0]), "--port", "0", "--reflection"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "ORT_DISABLE_TELEMETRY": "1"})
    line = proc.stdout.readline()
    assert "serving" in line, proc.stderr.read()
    address = line.strip().rsplit(" on ", 1)[1]
    yield address
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0


def _direct(onnx_path: Path, flux: np.ndarray):
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return session.run(None, {"flux": flux})


def _flux(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(1.0, 0.1, (n, 3011)).astype(np.float32)


# ------------------------------------------------------------------ KServe v2 via tritonclient


def test_triton_client_metadata_and_readiness(server):
    client = triton.InferenceServerClient(server)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("rbm") and not client.is_model_ready("broken")
    meta = client.get_model_metadata("rbm")
    assert meta.name == "rbm" and list(meta.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("flux", "FP32", [-1, 3011])]
    assert [t.name for t in meta.outputs] == ["probabilities", "free_energy"]
    server_meta = client.get_server_metadata()
    assert server_meta.name == "specserve"
    assert {"model_configuration", "model_repository", "statistics"} <= set(server_meta.extensions)
    with pytest.raises(triton.InferenceServerException) as info:
        client.get_model_metadata("nope")
    assert "StatusCode.NOT_FOUND" in str(info.value.status())


def test_triton_client_infer_matches_direct_session(server, repo):
    client = triton.InferenceServerClient(server)
    flux = _flux(5)
    inp = triton.InferInput("flux", list(flux.shape), "FP32")
    inp.set_data_from_numpy(flux)
    result = client.infer("rbm", [inp], outputs=[triton.InferRequestedOutput("probabilities"),
                                                 triton.InferRequestedOutput("free_energy")])
    probs, free = _direct(repo[1], flux)
    np.testing.assert_allclose(result.as_numpy("probabilities"), probs, rtol=1e-6)
    np.testing.assert_allclose(result.as_numpy("free_energy"), free, rtol=1e-6)
    bad = triton.InferInput("flux", [2, 100], "FP32")
    bad.set_data_from_numpy(np.ones((2, 100), np.float32))
    with pytest.raises(triton.InferenceServerException) as info:
        client.infer("rbm", [bad])
    assert "INVALID_ARGUMENT" in str(info.value.status()) and "axis 1 must be 3011" in info.value.message()


def test_triton_stream_with_bad_message_in_the_middle(server, repo):
    client = triton.InferenceServerClient(server)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        flux = _flux(3, seed=1)
        for i in range(3):
            if i == 1:
                bad = triton.InferInput("flux", [1, 7], "FP32")
                bad.set_data_from_numpy(np.ones((1, 7), np.float32))
                client.async_stream_infer("rbm", [bad], request_id="bad")
            inp = triton.InferInput("flux", [1, 3011], "FP32")
            inp.set_data_from_numpy(flux[i:i + 1])
            client.async_stream_infer("rbm", [inp], request_id=str(i))
        got = [results.get(timeout=30) for _ in range(4)]
    finally:
        client.stop_stream()
    errors = [e for r, e in got if e is not None]
    answers = {r.get_response().id: r.as_numpy("probabilities") for r, e in got if e is None}
    assert len(errors) == 1 and "axis 1 must be 3011" in str(errors[0])
    probs, _ = _direct(repo[1], flux)
    assert sorted(answers) == ["0", "1", "2"]
    for i in range(3):
        # one-row and three-row batches take different kernel paths: float32 rounding only
        np.testing.assert_allclose(answers[str(i)][0], probs[i], rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ specserve.v1


def test_domain_analyze_real_spectra_matches_direct(server, repo, kit):
    files = sorted((kit / "lamost_dr1/fits").glob("*.fits"))[:8]
    spectra = [read_spectra(f)[0] for f in files]
    with Client(server) as client:
        rows = client.analyze(spectra)
        assert [m.name for m in client.list_models()] == ["broken", "rbm"]
    assert [r.id for r in rows] == [s.meta.object_id for s in spectra]
    checked = 0
    for s, row in zip(spectra, rows):
        assert row.ok
        prepared = OPTICAL_PREPROCESSING.apply(s.wavelength, s.flux, s.ivar, s.mask, z=s.meta.extra["z"])
        if prepared.mask.mean() > 0.25:
            assert row.notes and "covers" in row.notes[0]
            continue
        probs, free = _direct(repo[1], fill_masked(prepared.flux, prepared.mask)[None])
        assert row.values["p_cv"] == pytest.approx(float(probs[0, 1]), rel=1e-5, abs=1e-6)
        assert row.values["free_energy_cv"] == pytest.approx(float(free[0, 1]), rel=1e-5)
        checked += 1
    assert checked >= 5


def test_domain_stream_of_1000_spectra_keeps_ids(server):
    rng = np.random.default_rng(3)
    wave = 10 ** (3.567 + 1e-4 * np.arange(3100))
    items = [(f"s{i:04d}", wave, rng.normal(1, 0.05, 3100)) for i in range(1000)]
    with Client(server) as client:
        rows = list(client.stream(items, batch_size=50))
    assert [r.id for r in rows] == [f"s{i:04d}" for i in range(1000)]
    assert all(r.ok and 0.0 <= r.values["p_cv"] <= 1.0 for r in rows)


def test_domain_stream_reports_bad_messages_in_band(server):
    wave = np.linspace(3650, 7450, 3200)

    def request(rid: str, spectrum: pb.Spectrum, models=()):
        return pb.AnalyzeRequest(request_id=rid, spectra=[spectrum], models=list(models))

    good = to_proto(("good", wave, np.ones(3200)))
    mismatched = to_proto(("mismatch", wave, np.ones(3199)))
    nan = to_proto(("nan", wave, np.full(3200, np.nan)))
    empty = pb.Spectrum(id="empty")
    short_ivar = to_proto(("short-ivar", wave, np.ones(3200)))
    del short_ivar.ivar[:]
    short_ivar.ivar.extend([1.0] * 10)
    requests = [request("0", good), request("1", mismatched), request("2", good), request("3", nan),
                request("4", good, ["nope"]), request("5", empty), request("6", short_ivar), request("7", good),
                pb.AnalyzeRequest(request_id="8")]
    with grpc.insecure_channel(server) as channel:
        responses = list(pb_grpc.SpecServeStub(channel).AnalyzeStream(iter(requests), timeout=60))
    assert [r.request_id for r in responses] == [str(i) for i in range(9)]
    by_id = {r.request_id: r for r in responses}
    for rid in ("0", "2", "7"):
        (result,) = by_id[rid].results
        assert not result.HasField("error") and result.results[0].applicable
    for rid, text in (("1", "3200 wavelengths but 3199 flux"), ("3", "NaN"), ("5", "empty flux"),
                      ("6", "ivar has 10 values")):
        (result,) = by_id[rid].results
        assert result.error.code == pb.Error.INVALID_ARGUMENT and text in result.error.message, rid
    assert by_id["4"].error.code == pb.Error.NOT_FOUND and "nope" in by_id["4"].error.message
    assert by_id["8"].error.code == pb.Error.INVALID_ARGUMENT


def test_domain_status_codes(server):
    wave = np.linspace(3650, 7450, 3200)
    with grpc.insecure_channel(server) as channel:
        stub = pb_grpc.SpecServeStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Analyze(pb.AnalyzeRequest(spectra=[to_proto(("a", wave, np.ones(3200)))], models=["nope"]))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as info:
            stub.Analyze(pb.AnalyzeRequest())
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as info:
            stub.Analyze(pb.AnalyzeRequest(spectra=[to_proto(("a", wave, np.ones(3200)))], models=["broken"]))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "not ready" in info.value.details()
        ir = to_proto(("ir", np.linspace(15100, 16900, 500), np.ones(500)))
        (result,) = stub.Analyze(pb.AnalyzeRequest(spectra=[ir])).results
        assert not result.results[0].applicable and "covers 0%" in result.results[0].not_applicable_reason


def test_health_and_reflection(server):
    with grpc.insecure_channel(server) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"inference.GRPCInferenceService", "specserve.v1.SpecServe", "grpc.health.v1.Health"} <= names


def test_large_batch_above_default_message_limit(server):
    wave = 10 ** (3.567 + 1e-4 * np.arange(3100))
    items = [(f"big{i}", wave, np.ones(3100)) for i in range(400)]  # ~7.5 MB in one message
    with Client(server) as client:
        rows = client.analyze(items)
    assert len(rows) == 400 and all(r.ok for r in rows)


# ------------------------------------------------------------------ specserve analyze


def test_cli_analyze_writes_catalogues(server, kit, tmp_path):
    files = [str(p) for p in sorted((kit / "lamost_dr1/fits").glob("*.fits"))[:6]]
    broken = tmp_path / "broken.fits"
    broken.write_bytes(b"SIMPLE  = nonsense")
    for out in ("cat.csv", "cat.fits"):
        result = subprocess.run([SPECSERVE, "analyze", "--server", server, "--out", str(tmp_path / out),
                                 *files, str(broken)], capture_output=True, text=True, timeout=120)
        assert result.returncode == 1, result.stderr  # one unreadable file
        assert f"skipped {broken}" in result.stderr
        assert "6 spectra analysed, 0 rejected, 1 files unreadable" in result.stdout
    from astropy.table import Table

    for out in ("cat.csv", "cat.fits"):
        table = Table.read(tmp_path / out)
        assert len(table) == 6 and list(table["file"]) == files
        assert {"id", "p_cv", "p_non_cv", "free_energy_cv", "models", "notes"} <= set(table.colnames)
    ok = subprocess.run([SPECSERVE, "analyze", "--server", server, *files[:2]], capture_output=True, text=True,
                        timeout=120)
    assert ok.returncode == 0 and "2 spectra analysed" in ok.stdout


def test_cli_analyze_reports_unreachable_server(kit):
    t0 = time.monotonic()
    result = subprocess.run([SPECSERVE, "analyze", "--server", "127.0.0.1:1", "--wait", "1",
                             str(kit / "lamost_dr1/fits/spec-55862-B6212_sp06-003.fits")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "UNAVAILABLE" in result.stderr
    assert "no server answers at 127.0.0.1:1 after 1 s" in result.stderr and time.monotonic() - t0 < 30


def test_cli_analyze_takes_folders_globs_and_files_from_and_waits_for_a_late_server(repo, kit, tmp_path):
    """Inputs as an archive user gives them: a folder (recursive), a quoted glob, and a list on
    standard input; the command started before the server waits for it instead of failing."""
    import socket

    fits_dir = kit / "lamost_dr1" / "fits"
    files = sorted(fits_dir.glob("*.fits"))
    folder = tmp_path / "night" / "deep"
    folder.mkdir(parents=True)
    for f in files[:2]:
        (folder / f.name).symlink_to(f)
    with socket.socket() as probe:  # a free port for the server that comes later
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "cat.ecsv"
    analyze = subprocess.Popen([SPECSERVE, "analyze", "--server", f"127.0.0.1:{port}", "--wait", "60", "--models", "rbm",
                                str(tmp_path / "night"), str(fits_dir / (files[2].name[:-6] + "[" + files[2].name[-6] + "].fits")),
                                "--files-from", "-", "--out", str(out)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    analyze.stdin.write(f"# tonight\n{files[3]}\n\n")
    analyze.stdin.close()
    analyze.stdin = None  # written and closed: communicate() below only reads
    time.sleep(2)
    assert analyze.poll() is None, "analyze gave up before the server came"
    server = subprocess.Popen([SPECSERVE, "serve", "--repository", str(repo[0]), "--port", str(port),
                               "--metrics-port", "-1"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        stdout, stderr = analyze.communicate(timeout=120)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
    from specserve.runtime.catalogue import read_catalogue

    table = read_catalogue(out)
    expected = [str(folder / f.name) for f in files[:2]] + [str(fits_dir / files[2].name), str(files[3])]
    assert sorted(table["file"]) == sorted(expected), (stdout, stderr)
    assert "4 spectra analysed" in stdout


def test_second_server_on_a_busy_port_fails_clearly(server, repo):
    port = server.rsplit(":", 1)[1]
    result = subprocess.run([SPECSERVE, "serve", "--repository", str(repo[0]), "--port", port],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in result.stderr
    missing = subprocess.run([SPECSERVE, "serve", "--repository", str(repo[0] / "nope"), "--port", "0"],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "does not exist" in missing.stderr


def test_triton_get_model_config_is_the_repositorys_config(server, repo):
    from specserve.runtime.layout import read_config

    client = triton.InferenceServerClient(server)
    config = client.get_model_config("rbm").config
    on_disk = read_config(repo[0] / "rbm")
    assert config.max_batch_size == on_disk.max_batch_size == 256
    assert config == on_disk and config.platform == "onnxruntime_onnx"
    assert [t.name for t in config.input] == ["flux"]
    with pytest.raises(triton.InferenceServerException) as info:
        client.get_model_config("broken")
    assert "StatusCode.UNAVAILABLE" in str(info.value.status())


ONE_PROCESS = """
import asyncio, sys, threading
import numpy as np
import tritonclient.grpc as triton
from specserve.runtime.client import Client
from specserve.runtime.serving.server import create_server

async def main():
    server, port = create_server(sys.argv[1])
    await server.start()
    address = f"127.0.0.1:{port}"
    def requests():
        client = triton.InferenceServerClient(address)
        flux = np.ones((2, 3011), np.float32)
        inp = triton.InferInput("flux", [2, 3011], "FP32")
        inp.set_data_from_numpy(flux)
        probs = client.infer("rbm", [inp]).as_numpy("probabilities")
        with Client(address) as ours:
            (row,) = ours.analyze([("one", np.linspace(3700, 7400, 3000), np.ones(3000))])
        print(probs.shape, client.get_model_config("rbm").config.max_batch_size, "p_cv" in row.values)
    await asyncio.to_thread(requests)
    await server.stop(1)
    server.store.close()

asyncio.run(main())
"""


def test_tritonclient_and_the_server_in_one_process(repo):
    proc = subprocess.run([sys.executable, "-c", ONE_PROCESS, str(repo[0])], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "ORT_DISABLE_TELEMETRY": "1"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["(2,", "2)", "256", "True"]


def test_local_analysis_gives_the_servers_numbers(server, repo, kit, tmp_path):
    """The embedded runtime (``analyze --local``) and the server, on the same files and
    repository: the same rows, the same deterministic outputs."""
    from astropy.table import Table

    files = [str(p) for p in sorted((kit / "lamost_dr1/fits").glob("*.fits"))[:6]]
    files.append(str(kit / "sdss_dr12/spec-3764-55514-0972.fits"))
    tables = {}
    for how in ("server", "local"):
        out = tmp_path / f"{how}.csv"
        where = ["--server", server] if how == "server" else ["--local", "--repository", str(repo[0])]
        result = subprocess.run([SPECSERVE, "analyze", *where, "--out", str(out), *files],
                                capture_output=True, text=True, timeout=300,
                                env={**os.environ, "ORT_DISABLE_TELEMETRY": "1"})
        assert result.returncode == 0, result.stderr
        tables[how] = Table.read(out, format="ascii.csv")
    remote, local = tables["server"], tables["local"]
    assert list(remote["file"]) == list(local["file"]) == files and list(remote["id"]) == list(local["id"])
    np.testing.assert_allclose(np.asarray(local["p_cv"], float), np.asarray(remote["p_cv"], float), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(local["free_energy_cv"], float),
                               np.asarray(remote["free_energy_cv"], float), rtol=1e-6)


def test_variant_selection_names_what_is_missing(server, repo):
    from specserve.runtime.client import Client
    from specserve.runtime.embedded.local import LocalRuntime
    from specserve.runtime.errors import InvalidInputError, ModelNotFoundError
    from specserve.runtime.spectrum import SpectrumInput

    spectrum = SpectrumInput("x", np.linspace(3700, 7400, 3000), np.ones(3000))
    with Client(server) as client, pytest.raises(grpc.RpcError) as info:
        client.analyze([spectrum], variant="int8")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "rbm-int8" in info.value.details()
    with pytest.raises(ModelNotFoundError, match="rbm-int8"):
        LocalRuntime(repo[0], variant="int8").analyze([spectrum])
    with pytest.raises(InvalidInputError, match="unknown variant"):
        LocalRuntime(repo[0], variant="int4").analyze([spectrum])
    (outcome,) = LocalRuntime(repo[0]).analyze([spectrum])
    assert [r.model for r in outcome.results] == ["rbm"]


def test_cli_analyze_without_inputs_says_what_it_needs():
    result = subprocess.run([SPECSERVE, "analyze", "--server", "127.0.0.1:1"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "needs spectrum files, folders or --files-from" in result.stderr


def test_spectrum_arrays_cross_the_wire_packed_and_unpacked():
    """The server reads flux, ivar and mask from the packed bytes of the message; a sender that
    wrote a field unpacked (legal protobuf) is read the slow way, to the same arrays; a wrong
    count is named."""
    from specserve.protos import specserve_pb2 as pb
    from specserve.runtime.errors import InvalidSpectrumError
    from specserve.runtime.spectrum import SpectrumInput
    from specserve.runtime.wire import spectrum_from_proto, to_proto

    rng = np.random.default_rng(4)
    wave = np.linspace(4000.0, 7000.0, 300)  # not log-linear: explicit wavelengths
    flux = rng.normal(1.0, 0.1, 300).astype(np.float32)
    ivar = rng.uniform(1, 9, 300).astype(np.float32)
    mask = np.zeros(300, bool)
    mask[[3, 50, 299]] = True
    sent = to_proto(SpectrumInput("a", wave, flux, ivar, mask, redshift=0.01))
    got = spectrum_from_proto(pb.Spectrum.FromString(sent.SerializeToString()))
    np.testing.assert_array_equal(got.flux, np.where(mask, 0, flux))
    np.testing.assert_array_equal(got.ivar, np.where(mask, 0, ivar))  # masked pixels travel as ivar 0
    np.testing.assert_array_equal(got.wavelength, wave)
    assert got.redshift == 0.01 and got.mask is None
    # the same arrays written unpacked, field by field, and a mask without ivar
    unpacked = b"".join(bytes([(4 << 3) | 5]) + np.float32(v).tobytes() for v in flux)
    unpacked += b"".join(bytes([(6 << 3) | 0, int(m)]) for m in mask)
    message = pb.Spectrum(id="b", wavelength=pb.DoubleArray(values=wave.tolist()))
    message.MergeFromString(unpacked)
    slow = spectrum_from_proto(message)
    np.testing.assert_array_equal(slow.flux, flux)
    np.testing.assert_array_equal(slow.mask, mask)
    assert slow.ivar is None
    packed_mask = spectrum_from_proto(pb.Spectrum.FromString(to_proto(SpectrumInput("c", wave, flux, None, mask)).SerializeToString()))
    np.testing.assert_array_equal(packed_mask.mask, mask)
    short = to_proto(SpectrumInput("d", wave, flux, ivar))
    del short.ivar[-1]
    with pytest.raises(InvalidSpectrumError, match="ivar has 299 values but flux has 300"):
        spectrum_from_proto(short)
