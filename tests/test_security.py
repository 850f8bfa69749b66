"""Security of a real server on a real port: TLS, mutual TLS, certificate rotation, bearer tokens
and roles, model control, reflection, and the refusal to serve beyond loopback unprotected.
Certificates are made here with the `cryptography` package."""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from conftest import toy_rbm_repository

from specserve.runtime.client import Client, Credentials
from specserve.runtime.errors import SpecserveError
from specserve.runtime.serving.security import (
    CertificateWatch,
    Security,
    SecurityError,
    TLSFiles,
    Tokens,
    bearer,
    is_loopback,
)

SPECSERVE = str(Path(sys.executable).with_name("specserve"))
INFER_TOKEN = "infer-token-0123456789abcdef"
ADMIN_TOKEN = "admin-token-fedcba9876543210"
WAVE = np.linspace(3700, 7400, 3000)


# ------------------------------------------------------------------ certificates


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _certificate(subject: str, key, issuer: str, issuer_key, ca: bool = False, server: bool = False) -> bytes:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


class Authority:
    """A CA that signs server and client certificates into files."""

    def __init__(self, folder: Path, name: str):
        self.folder, self.name, self.key = folder, name, _key()
        self.cert = folder / f"{name}-ca.pem"
        self.cert.write_bytes(_certificate(name, self.key, name, self.key, ca=True))

    def issue(self, subject: str, server: bool = False) -> tuple[Path, Path]:
        key = _key()
        cert, key_file = self.folder / f"{self.name}-{subject}.pem", self.folder / f"{self.name}-{subject}.key"
        cert.write_bytes(_certificate(subject, key, self.name, self.key, server=server))
        key_file.write_bytes(_pem_key(key))
        return cert, key_file


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    return {name: Authority(folder, name) for name in ("servers", "other-servers", "clients", "strangers")}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("secure")
    repository, _ = toy_rbm_repository(tmp)
    tokens = tmp / "tokens"
    tokens.write_text(f"# pipelines\n{INFER_TOKEN}\n{ADMIN_TOKEN} admin   # operators\n")
    return repository, tokens


class Served:
    def __init__(self, proc: subprocess.Popen, address: str, log: Path):
        self.proc, self.address, self.log = proc, address, log

    def stop(self) -> str:
        """SIGTERM, a clean exit, and what the server wrote on stderr."""
        self.proc.send_signal(signal.SIGTERM)
        self.proc.communicate(timeout=30)
        err = self.log.read_text()
        assert self.proc.returncode == 0, err[-3000:]
        return err


def _serve(repo: Path, *options: str) -> Served:
    # stderr goes to a file: a pipe nobody reads fills up and blocks the server's logging
    log = Path(tempfile.mkstemp(prefix="specserve-serve-", suffix=".log")[1])
    with open(log, "w") as stderr:
        proc = subprocess.Popen([SPECSERVE, "serve", "--repository", str(repo), "--port", "0", "--metrics-port", "-1",
                                 "--device", "cpu", "--log-requests", *options],
                                stdout=subprocess.PIPE, stderr=stderr, text=True,
                                env={**os.environ, "ORT_DISABLE_TELEMETRY": "1"})
    line = proc.stdout.readline()
    assert "serving" in line, log.read_text()
    # the certificate names localhost, so clients connect by that name
    return Served(proc, "localhost:" + line.strip().rsplit(":", 1)[1], log)


def _analyze(address: str, credentials: Credentials) -> float:
    with Client(address, timeout=10, credentials=credentials) as client:
        (row,) = client.analyze([("one", WAVE, np.ones(3000))])
    return row.values["p_cv"]


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


# ------------------------------------------------------------------ TLS and tokens


@pytest.fixture(scope="module")
def tls_server(repo, pki):
    cert, key = pki["servers"].issue("server", server=True)
    served = _serve(repo[0], "--tls-cert", str(cert), "--tls-key", str(key), "--auth-tokens", str(repo[1]),
                    "--model-control", "explicit")
    yield served
    err = served.stop()
    assert INFER_TOKEN not in err and ADMIN_TOKEN not in err  # tokens are never logged


def test_tls_with_a_token_answers_and_plaintext_does_not(tls_server, pki):
    ca = pki["servers"].cert
    p_cv = _analyze(tls_server.address, Credentials(tls=True, tls_ca=ca, token=INFER_TOKEN))
    assert 0 <= p_cv <= 1
    plain = Credentials(token=INFER_TOKEN)
    assert _code(lambda: _analyze(tls_server.address, plain)) == grpc.StatusCode.UNAVAILABLE
    wrong_ca = Credentials(tls=True, tls_ca=pki["other-servers"].cert, token=INFER_TOKEN)
    assert _code(lambda: _analyze(tls_server.address, wrong_ca)) == grpc.StatusCode.UNAVAILABLE


def test_missing_and_unknown_tokens_are_refused(tls_server, pki):
    ca = pki["servers"].cert
    for token in (None, "not-a-known-token-at-all"):
        credentials = Credentials(tls=True, tls_ca=ca, token=token)
        assert _code(lambda: _analyze(tls_server.address, credentials)) == grpc.StatusCode.UNAUTHENTICATED, token
    # the stream RPC too, before any message is read
    with Client(tls_server.address, timeout=10, credentials=Credentials(tls=True, tls_ca=ca)) as client:
        with pytest.raises(grpc.RpcError) as info:
            list(client.stream([("one", WAVE, np.ones(3000))]))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in info.value.details()


def test_tritonclient_over_tls_with_headers_and_roles(tls_server, pki):
    """Triton's own client: ssl=True with the CA, the token in headers; load and unload need admin."""
    client = triton.InferenceServerClient(tls_server.address, ssl=True,
                                          root_certificates=str(pki["servers"].cert))
    infer = {"authorization": f"Bearer {INFER_TOKEN}"}
    admin = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    assert client.is_model_ready("rbm", headers=infer)
    inputs = triton.InferInput("flux", [2, 3011], "FP32")
    inputs.set_data_from_numpy(np.ones((2, 3011), np.float32))
    assert client.infer("rbm", [inputs], headers=infer).as_numpy("probabilities").shape == (2, 2)
    with pytest.raises(triton.InferenceServerException) as info:
        client.is_model_ready("rbm")
    assert "UNAUTHENTICATED" in str(info.value.status())
    with pytest.raises(triton.InferenceServerException) as info:
        client.unload_model("rbm", headers=infer)
    assert "PERMISSION_DENIED" in str(info.value.status()) and "admin" in info.value.message()
    assert client.is_model_ready("rbm", headers=infer)  # the refused unload changed nothing
    client.unload_model("rbm", headers=admin)
    assert not client.is_model_ready("rbm", headers=infer)
    client.load_model("rbm", headers=admin)
    assert client.is_model_ready("rbm", headers=infer)


def test_health_stays_open_without_a_token(tls_server, pki):
    credentials = grpc.ssl_channel_credentials(pki["servers"].cert.read_bytes())
    with grpc.secure_channel(tls_server.address, credentials) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="model/rbm"))
    assert status.status == health_pb2.HealthCheckResponse.SERVING


# ------------------------------------------------------------------ mutual TLS and rotation


def test_mutual_tls_requires_a_client_certificate_from_its_ca(repo, pki, tmp_path):
    cert, key = pki["servers"].issue("mtls-server", server=True)
    served = _serve(repo[0], "--tls-cert", str(cert), "--tls-key", str(key),
                    "--tls-client-ca", str(pki["clients"].cert))
    try:
        ca = pki["servers"].cert
        client_cert, client_key = pki["clients"].issue("pipeline")
        assert 0 <= _analyze(served.address, Credentials(True, ca, client_cert, client_key)) <= 1
        assert _code(lambda: _analyze(served.address, Credentials(True, ca))) == grpc.StatusCode.UNAVAILABLE
        stranger = pki["strangers"].issue("intruder")
        assert _code(lambda: _analyze(served.address, Credentials(True, ca, *stranger))) == grpc.StatusCode.UNAVAILABLE
    finally:
        served.stop()


def test_certificates_rotate_without_a_restart(repo, pki, tmp_path):
    """The files are replaced by a certificate from another CA: new connections get it at once
    (the server re-reads changed files at the next handshake), the server never restarts."""
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    first = pki["servers"].issue("rotating", server=True)
    cert.write_bytes(first[0].read_bytes())
    key.write_bytes(first[1].read_bytes())
    served = _serve(repo[0], "--tls-cert", str(cert), "--tls-key", str(key))
    try:
        old, new = Credentials(True, pki["servers"].cert), Credentials(True, pki["other-servers"].cert)
        assert _analyze(served.address, old) >= 0
        assert _code(lambda: _analyze(served.address, new)) == grpc.StatusCode.UNAVAILABLE
        second = pki["other-servers"].issue("rotated", server=True)
        time.sleep(0.01)  # a new modification time even on coarse clocks
        key.write_bytes(second[1].read_bytes())
        cert.write_bytes(second[0].read_bytes())
        assert _analyze(served.address, new) >= 0
        assert _code(lambda: _analyze(served.address, old)) == grpc.StatusCode.UNAVAILABLE
        assert served.proc.poll() is None
    finally:
        served.stop()


def test_sighup_rereads_and_a_bad_rotation_keeps_the_previous_certificate(pki, tmp_path):
    cert, key = pki["servers"].issue("unit", server=True)
    watch = CertificateWatch(TLSFiles(cert, key))
    assert watch.fetch() is None  # nothing changed
    watch.reload()  # SIGHUP
    assert watch.fetch() is not None and watch.rotations == 1
    key.write_text("half-written")
    os.utime(key, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert watch.fetch() is None and watch.rotations == 1  # logged; the previous certificate stays
    with pytest.raises(SecurityError, match="not a PEM private key"):
        CertificateWatch(TLSFiles(cert, key))
    with pytest.raises(SecurityError, match="cannot read the TLS certificate"):
        CertificateWatch(TLSFiles(tmp_path / "missing.pem", key))


# ------------------------------------------------------------------ safe defaults


def test_a_non_loopback_address_without_tls_and_tokens_is_refused(repo):
    started = time.perf_counter()
    result = subprocess.run([SPECSERVE, "serve", "--repository", str(repo[0]), "--host", "0.0.0.0", "--port", "0"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and time.perf_counter() - started < 30
    assert "refusing to serve on 0.0.0.0 without TLS" in result.stderr and "tokens" in result.stderr
    assert "--insecure" in result.stderr and "serving" not in result.stdout
    with pytest.raises(SecurityError, match="without tokens"):
        Security(tls=TLSFiles(*(Path("x"),) * 2), watch=object()).check_address("10.1.2.3")
    Security(insecure=True).check_address("0.0.0.0")
    for host in ("127.0.0.1", "localhost", "[::1]", "127.8.9.10"):
        Security().check_address(host)
    assert not is_loopback("example.org") and not is_loopback("")


def test_by_default_model_control_and_reflection_are_off(repo):
    served = _serve(repo[0])
    try:
        client = triton.InferenceServerClient(served.address)
        with pytest.raises(triton.InferenceServerException) as info:
            client.unload_model("rbm")
        assert "UNAVAILABLE" in str(info.value.status()) and "--model-control explicit" in info.value.message()
        assert client.is_model_ready("rbm")
        with grpc.insecure_channel(served.address) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            code = _code(lambda: list(stub.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]))))
        assert code == grpc.StatusCode.UNIMPLEMENTED
    finally:
        served.stop()


# ------------------------------------------------------------------ token files and client credentials


def test_token_files_name_the_bad_line_never_the_token(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(f"{INFER_TOKEN} root\n")
    with pytest.raises(SecurityError, match="line 1: unknown role 'root'") as info:
        Tokens.from_file(path)
    assert INFER_TOKEN not in str(info.value)
    path.write_text("# nothing\n\n")
    with pytest.raises(SecurityError, match="holds no token"):
        Tokens.from_file(path)
    path.write_text("short admin\n")
    with pytest.raises(SecurityError, match="at least 16 characters"):
        Tokens.from_file(path)
    path.write_text(f"{INFER_TOKEN}\n{ADMIN_TOKEN} admin\n")
    tokens = Tokens.from_file(path)
    assert tokens.role(INFER_TOKEN) == "infer" and tokens.role(ADMIN_TOKEN) == "admin"
    assert tokens.role(INFER_TOKEN[:-1]) is None and tokens.role("") is None
    assert bearer([("authorization", f"Bearer {ADMIN_TOKEN}")]) == ADMIN_TOKEN
    assert bearer([("authorization", "Basic abc")]) == "" and bearer([("x-other", "1")]) is None


def test_client_credentials_from_options_and_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECSERVE_TOKEN", INFER_TOKEN)
    assert Credentials.from_options().metadata == (("authorization", f"Bearer {INFER_TOKEN}"),)
    token_file = tmp_path / "token"
    token_file.write_text(ADMIN_TOKEN + "\n")
    credentials = Credentials.from_options(tls_ca=tmp_path / "ca.pem", token_file=token_file)
    assert credentials.tls and credentials.token == ADMIN_TOKEN
    with pytest.raises(SpecserveError, match="go together"):
        Credentials.from_options(client_cert=tmp_path / "c.pem")
    with pytest.raises(SpecserveError, match="cannot read the token file"):
        Credentials.from_options(token_file=tmp_path / "missing")
    monkeypatch.delenv("SPECSERVE_TOKEN")
    assert Credentials.from_options().metadata == ()


def test_analyze_command_with_tls_and_a_token(tls_server, pki, kit, tmp_path):
    files = [str(p) for p in sorted((kit / "lamost_dr1/fits").glob("*.fits"))[:2]]
    token_file = tmp_path / "token"
    token_file.write_text(INFER_TOKEN)
    base = [SPECSERVE, "analyze", "--server", tls_server.address, "--models", "rbm", *files]
    ok = subprocess.run([*base, "--tls-ca", str(pki["servers"].cert), "--token-file", str(token_file)],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    refused = subprocess.run([*base, "--tls-ca", str(pki["servers"].cert)], capture_output=True, text=True,
                             timeout=120, env={k: v for k, v in os.environ.items() if k != "SPECSERVE_TOKEN"})
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr


def test_watch_command_with_tls_and_a_token(tls_server, pki, kit, tmp_path):
    folder = tmp_path / "incoming"
    folder.mkdir()
    for path in sorted((kit / "lamost_dr1/fits").glob("*.fits"))[:2]:
        (folder / path.name).symlink_to(path)
    token_file = tmp_path / "token"
    token_file.write_text(INFER_TOKEN)
    out = tmp_path / "watched.csv"
    base = [SPECSERVE, "watch", str(folder), "--server", tls_server.address, "--models", "rbm",
            "--once", "--tls-ca", str(pki["servers"].cert)]
    ok = subprocess.run([*base, "--out", str(out), "--token-file", str(token_file)], capture_output=True, text=True,
                        timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert len(out.read_text().strip().splitlines()) == 3  # a header and one row per file
    refused = subprocess.run([*base, "--out", str(tmp_path / "other.csv")], capture_output=True, text=True, timeout=120,
                             env={k: v for k, v in os.environ.items() if k != "SPECSERVE_TOKEN"})
    assert refused.returncode != 0 and "UNAUTHENTICATED" in refused.stderr, refused.stderr


def test_load_benchmark_measures_a_protected_server(tls_server, pki, repo, kit, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(INFER_TOKEN)
    base = [SPECSERVE, "bench", "load", "--server", tls_server.address, "--repository", str(repo[0]), "--model", "rbm",
            "--seconds", "0.3", "--rate", "100", "--tls-ca", str(pki["servers"].cert)]
    ok = subprocess.run([*base, "--token-file", str(token_file)], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    figures = dict(re.findall(r"rbm: (unary|stream|at) ([\d,]+)", ok.stdout))
    assert set(figures) == {"unary", "stream", "at"} and all(float(v.replace(",", "")) > 0 for v in figures.values())
    assert ", 0 failed" in ok.stdout
    refused = subprocess.run(base, capture_output=True, text=True, timeout=120,
                             env={k: v for k, v in os.environ.items() if k != "SPECSERVE_TOKEN"})
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr, refused.stderr


# ------------------------------------------------------------------ names and paths


def test_model_names_are_checked_and_no_message_shows_a_path(repo, tmp_path):
    """An empty, hidden or multi-segment name is INVALID_ARGUMENT (an empty one used to load the
    repository itself as a phantom model); reasons and errors name models, never the server's
    folders."""
    root = tmp_path / "repo"
    import shutil

    shutil.copytree(repo[0], root)
    (root / "broken" / "1").mkdir(parents=True)
    (root / "broken" / "1" / "model.onnx").write_bytes(b"not an onnx file")
    served = _serve(root, "--model-control", "explicit")
    try:
        client = triton.InferenceServerClient(served.address)
        for name in ("", "../rbm", ".hidden", "a/b"):
            with pytest.raises(triton.InferenceServerException) as info:
                client.load_model(name)
            assert "INVALID_ARGUMENT" in str(info.value.status()), name
        index = client.get_model_repository_index(as_json=True)["models"]
        assert sorted(m["name"] for m in index) == ["broken", "rbm"]
        messages = [m.get("reason", "") for m in index]
        for name in ("broken", "nothing"):
            with pytest.raises(triton.InferenceServerException) as info:
                client.load_model(name)
            messages.append(info.value.message())
        assert any("broken" in m for m in messages) and any("<repository>" in m for m in messages)
        for message in messages:
            assert str(root) not in message and str(root.resolve()) not in message and str(tmp_path) not in message
    finally:
        served.stop()


# ------------------------------------------------------------------ malformed messages


def _mutants(valid: bytes, rng: np.random.Generator, n: int) -> list[bytes]:
    """Bit flips, truncations, insertions and random bytes from one valid message."""
    out = []
    for i in range(n):
        data = bytearray(valid)
        kind = i % 4
        if kind == 0:
            for _ in range(rng.integers(1, 8)):
                data[rng.integers(len(data))] ^= 1 << int(rng.integers(8))
        elif kind == 1:
            data = data[: rng.integers(len(data))]
        elif kind == 2:
            at = int(rng.integers(len(data)))
            data[at:at] = rng.bytes(int(rng.integers(1, 16)))
        else:
            data = bytearray(rng.bytes(int(rng.integers(1, 64))))
        out.append(bytes(data))
    return out


def test_thousands_of_mutated_messages_get_clean_statuses_and_streams_go_on(repo):
    """Fuzz: mutated KServe and domain messages, unary and streamed. Never UNKNOWN or INTERNAL, no
    traceback in the log, every stream message answered, the server alive and serving after."""
    from specserve.protos import specserve_pb2 as pb
    from specserve.protos.kserve import service_pb2 as kserve
    from specserve.runtime.wire import to_proto

    infer = kserve.ModelInferRequest(model_name="rbm", id="fuzz")
    infer.inputs.add(name="flux", datatype="FP32", shape=[1, 3011])
    infer.raw_input_contents.append(np.ones(3011, np.float32).tobytes())
    analyze = pb.AnalyzeRequest(request_id="fuzz", spectra=[to_proto(("one", WAVE[::10], np.ones(300)))])
    rng = np.random.default_rng(7)
    served = _serve(repo[0])
    codes: dict[str, int] = {}
    try:
        with grpc.insecure_channel(served.address) as channel:
            for method, valid in (("/inference.GRPCInferenceService/ModelInfer", infer.SerializeToString()),
                                  ("/specserve.v1.SpecServe/Analyze", analyze.SerializeToString())):
                call = channel.unary_unary(method)
                for data in _mutants(valid, rng, 1000):
                    try:
                        call(data, timeout=10)
                        codes["OK"] = codes.get("OK", 0) + 1
                    except grpc.RpcError as exc:
                        codes[exc.code().name] = codes.get(exc.code().name, 0) + 1
            for method, valid in (("/inference.GRPCInferenceService/ModelStreamInfer", infer.SerializeToString()),
                                  ("/specserve.v1.SpecServe/AnalyzeStream", analyze.SerializeToString())):
                messages = _mutants(valid, rng, 300) + [valid]
                answers = list(channel.stream_stream(method)(iter(messages), timeout=60))
                assert len(answers) == len(messages), method  # one bad message no longer ends the stream
                last = (kserve.ModelStreamInferResponse if "Infer" in method else pb.AnalyzeStreamResponse).FromString(
                    answers[-1])
                assert not (last.error_message if "Infer" in method else last.HasField("error"))  # the valid one
        assert set(codes) <= {"OK", "INVALID_ARGUMENT", "NOT_FOUND"}, codes
        assert codes.get("INVALID_ARGUMENT", 0) > 1000
        with grpc.insecure_channel(served.address) as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        assert status.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        err = served.stop()
    assert "Traceback" not in err and "undecodable" in err


def test_typed_and_raw_contents_together_are_refused(repo):
    served = _serve(repo[0])
    try:
        client = triton.InferenceServerClient(served.address)
        with grpc.insecure_channel(served.address) as channel:
            from specserve.protos.kserve import service_pb2 as kserve
            from specserve.protos.kserve import service_pb2_grpc as kserve_grpc

            request = kserve.ModelInferRequest(model_name="rbm")
            tensor = request.inputs.add(name="flux", datatype="FP32", shape=[1, 3011])
            tensor.contents.fp32_contents.extend([1.0] * 3011)
            request.raw_input_contents.append(np.ones(3011, np.float32).tobytes())
            with pytest.raises(grpc.RpcError) as info:
                kserve_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "raw_input_contents" in info.value.details()
        assert client.is_model_ready("rbm")
    finally:
        served.stop()
