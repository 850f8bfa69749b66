"""Serving benchmarks (``make bench``): every figure is a ratio, or two measurements taken side by
side in one run, with the client and the servers on this machine. Nothing here imports torch. The
ONNX Runtime vs torch rows live in :mod:`specserve.export.bench.suite`, which also writes BENCHMARKS.md.

- transport ceiling: single-spectrum KServe ``ModelStreamInfer`` requests to the RBM, against a
  bare grpc.aio echo server. The echo server answers each message with the very bytes the RBM's
  answer had, so both carry the same sizes. This is the most a Python gRPC server can do here. Both
  are driven by the same raw-bytes client, and the two runs alternate;
- serving overhead: ``AnalyzeStream`` with every model against the same analyser run in-process on
  the same sessions and spectra (no gRPC), with the same concurrency;
- latency: single-spectrum ``ModelInfer`` requests per model, sent open-loop at 10, 50 and 90 % of
  the closed-loop maximum measured just before;
- exposure: 4,000 LAMOST spectra from the kit (cycled) through the full pipeline, through the
  client library at its default settings.

The servers run as subprocesses (``specserve serve``, and ``python -m
specserve.export.bench.serving echo``), so client and server do not share an interpreter. The
KServe protos are imported only when a benchmark runs: tritonclient ships its own copy of them,
and the two cannot share a process (the tests import tritonclient).
"""

from __future__ import annotations

import asyncio
import gc
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import grpc
import numpy as np

from specserve.runtime.client import Credentials
from specserve.runtime.errors import SpecserveError

STREAM_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"
INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)]
LOAD_FRACTIONS = (0.1, 0.5, 0.9)


# ------------------------------------------------------------------ the machine


def machine() -> dict[str, str]:
    """What the numbers were measured on."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = ""
    try:
        kb = int(next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal")).split()[1])
        memory = f"{kb / 2**20:.1f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    versions = {}
    for package in ("onnxruntime-gpu", "onnxruntime", "grpcio", "numpy", "torch"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return {"cpu": cpu, "cores": str(len(os.sched_getaffinity(0))), "memory": memory,
            "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
            "packages": ", ".join(f"{k} {v}" for k, v in versions.items()),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


# ------------------------------------------------------------------ server processes


@contextmanager
def server_process(repository: Path, device: str = "cpu"):
    """``specserve serve`` on a free port; yields its address."""
    command = [str(Path(sys.executable).with_name("specserve")), "serve", "--repository", str(repository),
               "--port", "0", "--metrics-port", "-1", "--poll-repository", "0", "--device", device]
    with spawn(command, "serving") as (_, address):
        yield address


@contextmanager
def echo_process(response: bytes, skeleton: bool = False):
    """The bare grpc.aio echo server answering every stream message with ``response``. With
    ``skeleton``, the server's own stream structure instead: KServe protos parsed and written,
    answers through the in-order window, no model work."""
    with tempfile.NamedTemporaryFile(suffix=".bin") as f:
        f.write(response)
        f.flush()
        command = [sys.executable, "-m", "specserve.export.bench.serving", "echo", f.name]
        with spawn(command + (["--skeleton"] if skeleton else []), "echo") as (_, address):
            yield address


@contextmanager
def spawn(command: list[str], word: str):
    """Run ``command`` (stderr to a file: a full pipe would block it) until its first stdout line,
    which must hold ``word`` and end with `` on ADDRESS``; yields ``(process, address)`` and stops
    it with SIGTERM (SIGKILL after 60 s)."""
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True,
                            env={**os.environ, "ORT_DISABLE_TELEMETRY": "1"})
    try:
        line = proc.stdout.readline()
        if word not in line:
            log.seek(0)
            raise SpecserveError(f"{command[0]} did not start: {log.read().decode()[-2000:]}")
        yield proc, line.strip().rsplit(" on ", 1)[1]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


async def _echo(response_file: str, skeleton: bool = False) -> None:
    response = Path(response_file).read_bytes()

    async def stream(request_iterator, context):
        async for _ in request_iterator:
            yield response

    handler = grpc.stream_stream_rpc_method_handler(stream)  # no (de)serialisers: raw bytes
    if skeleton:
        from specserve.protos.kserve import service_pb2 as kserve
        from specserve.runtime.serving.streams import answer_in_order

        message = kserve.ModelStreamInferResponse.FromString(response)

        async def answer() -> object:
            return message

        async def structured(request_iterator, context):
            async for out in answer_in_order(request_iterator, lambda _: answer(), asyncio.Event()):
                yield out

        handler = grpc.stream_stream_rpc_method_handler(
            structured, request_deserializer=kserve.ModelInferRequest.FromString,
            response_serializer=kserve.ModelStreamInferResponse.SerializeToString)
    server = grpc.aio.server(options=CHANNEL_OPTIONS)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "inference.GRPCInferenceService", {"ModelStreamInfer": handler})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"echo on 127.0.0.1:{port}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(1)


# ------------------------------------------------------------------ clients


def _channel(address: str, credentials: Credentials | None) -> grpc.aio.Channel:
    """A load generator's channel: plaintext, or as ``credentials`` say (TLS, mTLS)."""
    return (credentials or Credentials()).aio_channel(address, CHANNEL_OPTIONS)


async def stream_rate(address: str, payload: bytes, n_streams: int = 4, per_stream: int = 1000,
                      credentials: Credentials | None = None) -> tuple[float, bytes]:
    """Messages per second over ``n_streams`` ModelStreamInfer streams of ``per_stream`` raw
    messages each (written as fast as flow control allows), and the last answer's bytes."""
    last = b""
    headers = credentials.metadata if credentials else ()
    async with _channel(address, credentials) as channel:
        call = channel.stream_stream(STREAM_METHOD)

        async def one() -> int:
            nonlocal last
            stream = call(metadata=headers)

            async def write() -> None:
                for _ in range(per_stream):
                    await stream.write(payload)
                await stream.done_writing()

            writer = asyncio.create_task(write())
            count = 0
            async for answer in stream:
                count += 1
                last = answer
            await writer
            return count

        await asyncio.gather(*(one() for _ in range(n_streams)))  # warm-up: connections, sessions
        t0 = time.perf_counter()
        counts = await asyncio.gather(*(one() for _ in range(n_streams)))
        seconds = time.perf_counter() - t0
    if sum(counts) != n_streams * per_stream:
        raise SpecserveError(f"{sum(counts)} answers for {n_streams * per_stream} messages")
    return sum(counts) / seconds, last


async def closed_loop_rate(address: str, payload: bytes, concurrency: int = 16, seconds: float = 2.0,
                           credentials: Credentials | None = None) -> float:
    """Unary ModelInfer requests per second with ``concurrency`` callers, each sending its next
    request when its answer is back."""
    headers = credentials.metadata if credentials else ()
    async with _channel(address, credentials) as channel:
        infer = channel.unary_unary(INFER_METHOD)
        for _ in range(10):
            await infer(payload, metadata=headers)
        stop_at = time.perf_counter() + seconds
        done = 0

        async def caller() -> None:
            nonlocal done
            while time.perf_counter() < stop_at:
                await infer(payload, metadata=headers)
                done += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        return done / (time.perf_counter() - t0)


async def open_loop_latencies(address: str, payload: bytes, rate: float, seconds: float = 3.0,
                              max_requests: int = 6000, credentials: Credentials | None = None,
                              ) -> tuple[np.ndarray, float, int]:
    """Send unary ModelInfer requests at a fixed ``rate`` (open loop: a request goes out on
    schedule whether or not earlier ones are back). Returns the latencies in seconds, the rate
    achieved, and the number of failed requests."""
    n = int(min(max_requests, max(50, rate * seconds)))
    latencies = np.full(n, np.nan)
    failed = 0
    headers = credentials.metadata if credentials else ()
    async with _channel(address, credentials) as channel:
        infer = channel.unary_unary(INFER_METHOD)
        warm, patience = 0, time.monotonic() + 60.0
        while warm < 10:  # a server still draining an earlier overload refuses calls for a while
            try:
                await infer(payload, timeout=30, metadata=headers)
                warm += 1
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > patience:
                    raise
                await asyncio.sleep(0.05)

        async def one(i: int) -> None:
            nonlocal failed
            t0 = time.perf_counter()
            try:
                await infer(payload, timeout=30, metadata=headers)
            except grpc.aio.AioRpcError:
                failed += 1
                return
            latencies[i] = time.perf_counter() - t0

        tasks = []
        gc.collect()
        gc.disable()  # the load generator's own collections would show up as server latency
        try:
            start = time.perf_counter()
            for i in range(n):
                delay = start + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(i)))
            sent = time.perf_counter() - start
            await asyncio.gather(*tasks)
        finally:
            gc.enable()
    return latencies[np.isfinite(latencies)], n / max(sent, 1e-9), failed


def infer_request(model: str, inputs: dict[str, np.ndarray]):
    """A KServe ModelInferRequest with ``inputs`` in raw_input_contents."""
    from specserve.protos.kserve import service_pb2 as kserve

    request = kserve.ModelInferRequest(model_name=model)
    kinds = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64"}
    for name, array in inputs.items():
        request.inputs.add(name=name, datatype=kinds[array.dtype], shape=list(array.shape))
        request.raw_input_contents.append(np.ascontiguousarray(array).tobytes())
    return request


# ------------------------------------------------------------------ inputs


def lamost_inputs(root: Path) -> list:
    """The kit's LAMOST DR1 spectra as requests, each named after its file."""
    from specserve.export.bench.engine import lamost_spectra
    from specserve.runtime.spectrum import SpectrumInput

    return [SpectrumInput.from_spectrum(s, Path(s.meta.file).stem) for s in lamost_spectra(root)]


def model_requests(repository: Path, spectra: list, names: tuple[str, ...] = ()) -> dict[str, bytes]:
    """``spectra`` through each spectrum model's own preprocessing (the runtime's data path), as
    one serialised ModelInferRequest per model (only the models ``names``, when given)."""
    from specserve.runtime.engine.repository import load_model_dir
    from specserve.runtime.layout import model_folders
    from specserve.runtime.pipeline import checked, prepare

    spectra = [checked(s) for s in spectra]
    out = {}
    for folder in model_folders(repository):
        if names and folder.name not in names:
            continue
        model = load_model_dir(folder)
        if not model.ready or "flux" not in model.card.contract.input_names:
            continue
        prepared = prepare(model.card.preprocessing, spectra)
        inputs = {"flux": prepared.model_flux()}
        if "ivar" in model.card.contract.input_names:
            inputs["ivar"] = prepared.model_ivar()
        out[folder.name] = infer_request(folder.name, inputs).SerializeToString()
    return out


def remote_load(address: str, repository: Path, model: str, credentials: Credentials | None = None,
                rate: float = 200.0, seconds: float = 3.0) -> list[str]:
    """A running server measured from this machine (``specserve bench load``), over TLS and with a
    token when ``credentials`` say so: unary requests per second with 16 callers, stream messages
    per second over 4 streams, and latency percentiles at ``rate`` requests a second. The request is
    the kit's first LAMOST spectrum prepared for ``model`` as ``repository`` holds it (the same
    model the server serves)."""
    from specserve.runtime.datakit import data_dir

    payload = model_requests(repository, lamost_inputs(data_dir())[:1], (model,)).get(model)
    if payload is None:
        raise SpecserveError(f"{repository} has no spectrum model {model!r} to build its requests from")
    unary = asyncio.run(closed_loop_rate(address, payload, 16, seconds, credentials))
    per_stream = max(20, int(unary * seconds / 4))
    streamed, _ = asyncio.run(stream_rate(address, payload, 4, per_stream, credentials))
    latencies, achieved, failed = asyncio.run(open_loop_latencies(address, payload, rate, seconds,
                                                                  credentials=credentials))
    if not len(latencies):
        raise SpecserveError(f"none of the {failed} requests at {rate:.0f}/s was answered")
    p50, p99 = np.percentile(latencies, [50, 99]) * 1e3
    return [f"{address} {model}: unary {unary:,.0f} requests/s (16 callers)",
            f"{address} {model}: stream {streamed:,.0f} messages/s (4 streams of {per_stream})",
            f"{address} {model}: at {achieved:,.0f} requests/s: p50 {p50:.2f} ms, p99 {p99:.2f} ms, {failed} failed"]


def single_requests(repository: Path, spectra: list) -> dict[str, bytes]:
    """The first spectrum on each spectrum model's grid, as a serialised ModelInferRequest."""
    return model_requests(repository, spectra[:1])


# ------------------------------------------------------------------ results


@dataclass
class Row:
    benchmark: str
    measured: str
    ratio: str = ""
    target: str = ""
    verdict: str = ""


@dataclass
class Section:
    title: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


# ------------------------------------------------------------------ the serving benchmarks


def transport_ceiling(repository: Path, requests: dict[str, bytes], n_streams: int = 4, per_stream: int = 1000,
                      rounds: int = 2, device: str = "cpu") -> Section:
    """``requests``: :func:`single_requests`; the RBM's is the one sent."""
    if "rbm" not in requests:
        raise SpecserveError(f"the transport benchmark needs a ready rbm model in {repository}")
    payload = requests["rbm"]
    with server_process(repository, device) as address:
        from specserve.protos.kserve import service_pb2 as kserve

        _, answer = asyncio.run(stream_rate(address, payload, 1, 20))
        response = kserve.ModelStreamInferResponse.FromString(answer)
        if response.error_message:
            raise SpecserveError(f"the RBM answered with an error: {response.error_message}")
        with echo_process(answer) as echo:
            with echo_process(answer, skeleton=True) as bones:
                served, bare, structure = [], [], []
                for _ in range(rounds):  # alternate, best of each
                    bare.append(asyncio.run(stream_rate(echo, payload, n_streams, per_stream))[0])
                    served.append(asyncio.run(stream_rate(address, payload, n_streams, per_stream))[0])
                    structure.append(asyncio.run(stream_rate(bones, payload, n_streams, per_stream))[0])
    ratio = max(served) / max(bare)
    per_request, mean_batch = asyncio.run(_request_path(repository, payload))
    section = Section("Transport ceiling (RBM, single-spectrum ModelStreamInfer vs bare grpc.aio echo)")
    section.rows.append(Row(
        f"{n_streams} streams x {per_stream} messages ({len(payload):,} B in, {len(answer):,} B out), best of {rounds}",
        f"specserve {max(served):,.0f} msg/s; echo {max(bare):,.0f} msg/s",
        f"{ratio:.0%} of echo", ">= 60 %", verdict(ratio >= 0.6)))
    section.rows.append(Row(
        "the server's stream structure alone (KServe protos parsed and written, in-order window), no model work",
        f"{max(structure):,.0f} msg/s", f"{max(structure) / max(bare):.0%} of echo"))
    section.rows.append(Row(
        "the same request without gRPC, in one process: decode, contract checks, batcher, ONNX Runtime, "
        "response (64 in flight)",
        f"{per_request:.1f} us per request (mean batch {mean_batch:.0f} rows)",
        f"{1e6 / per_request:,.0f} requests/s without gRPC"))
    return section


async def _request_path(repository: Path, payload: bytes, n: int = 6400) -> tuple[float, float]:
    """Microseconds per request of the server's ModelInfer path without gRPC (the RBM behind its
    batcher, 64 requests in flight), and the mean batch size it ran."""
    from specserve.protos.kserve import service_pb2 as kserve
    from specserve.runtime.engine.repository import load_model_dir
    from specserve.runtime.serving.kserve import infer_start

    model = load_model_dir(repository / "rbm", n_models=len([d for d in repository.iterdir() if d.is_dir()]))
    model.start_batching()

    class Store:
        def ready_model(self, name: str, version: str = ""):
            return model

    request = kserve.ModelInferRequest.FromString(payload)
    try:
        for _ in range(64):
            await infer_start(Store(), request)
        before = model.stats.snapshot()
        t0 = time.perf_counter()
        for _ in range(n // 64):
            for answer in [infer_start(Store(), request) for _ in range(64)]:
                kserve.ModelStreamInferResponse(infer_response=await answer).SerializeToString()
        seconds = time.perf_counter() - t0
        after = model.stats.snapshot()
    finally:
        model.stop_batching()
    runs = after["execution_count"] - before["execution_count"]
    return seconds / n * 1e6, (after["inference_count"] - before["inference_count"]) / max(runs, 1)


def serving_overhead(repository: Path, spectra: list, n_streams: int = 4, per_message: int = 32,
                     rounds: int = 2) -> Section:
    """AnalyzeStream with every model vs the same analyser in-process, ``n_streams`` at once;
    the two alternate ``rounds`` times and the best of each is compared."""
    from specserve.runtime.client import Client
    from specserve.runtime.embedded.analysis import Analyzer
    from specserve.runtime.embedded.providers import Device
    from specserve.runtime.engine.repository import load_repository
    from specserve.runtime.wire import to_proto

    messages = [spectra[i:i + per_message] for i in range(0, len(spectra), per_message)]
    shares = [messages[s::n_streams] for s in range(n_streams)]
    protos = [[[to_proto(s) for s in message] for message in share] for share in shares]
    analyzer = Analyzer(load_repository(repository, Device()))
    analyzer.analyze(messages[0])  # warm-up

    def in_process(share: list) -> None:
        for message in share:
            analyzer.analyze(message)

    local, served = [], []
    with server_process(repository) as address:
        with Client(address) as client:
            list(client.stream(protos[0][0], batch_size=per_message))  # warm-up

        def remote(share: list) -> None:
            with Client(address) as client:
                rows = list(client.stream([s for message in share for s in message], batch_size=per_message))
                if len(rows) != sum(len(m) for m in share) or not all(r.ok for r in rows):
                    raise SpecserveError("AnalyzeStream lost or failed spectra")

        for _ in range(rounds):  # the idle server's threads sleep while the in-process run goes
            local.append(_threads(in_process, shares))
            served.append(_threads(remote, protos))
    n = len(spectra)
    ratio = min(local) / min(served)
    section = Section("Serving overhead (AnalyzeStream, every model, vs the same pipeline in-process)")
    section.rows.append(Row(
        f"{n:,} LAMOST spectra, {n_streams} concurrent streams / threads, {per_message} spectra per message, "
        f"best of {rounds}",
        f"served {n / min(served):,.0f} spectra/s; in-process {n / min(local):,.0f} spectra/s",
        f"{ratio:.0%} of in-process", ">= 70 %", verdict(ratio >= 0.7)))
    return section


def _threads(work, shares: list) -> float:
    """Seconds for one thread per share to finish ``work(share)``; the first error is raised."""
    errors: list[BaseException] = []

    def run(share) -> None:
        try:
            work(share)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(s,)) for s in shares]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - t0


def latency(repository: Path, requests: dict[str, bytes], seconds: float = 3.0, device: str = "cpu",
            repeats: int = 3) -> Section:
    """Per model: closed-loop maximum, then p50/p99 at 10/50/90 % of it (open loop), each level
    run ``repeats`` times: the medians are reported, with the spread of p99."""
    section = Section("Latency of single-spectrum ModelInfer requests (open loop at a fraction of the maximum; "
                      f"median of {repeats} runs of {seconds:g} s)")
    with server_process(repository, device) as address:
        for model, payload in requests.items():
            peak = asyncio.run(closed_loop_rate(address, payload))
            for fraction in LOAD_FRACTIONS:
                p50s, p99s, rates, failures, count = [], [], [], 0, 0
                for _ in range(repeats):
                    lat, achieved, failed = asyncio.run(open_loop_latencies(address, payload, peak * fraction, seconds))
                    p50, p99 = (np.percentile(lat, [50, 99]) * 1e3) if lat.size else (float("nan"),) * 2
                    p50s.append(p50)
                    p99s.append(p99)
                    rates.append(achieved)
                    failures += failed
                    count += lat.size + failed
                p50, p99 = float(np.median(p50s)), float(np.median(p99s))
                target, ok = "", ""
                if model == "rbm" and fraction == 0.5:
                    target, ok = "p99 < 5 ms", verdict(p99 < 5.0 and not failures)
                section.rows.append(Row(
                    f"{model} at {fraction:.0%} of {peak:,.0f} req/s ({count} requests)",
                    f"p50 {p50:.2f} ms, p99 {p99:.2f} ms (runs {min(p99s):.2f}-{max(p99s):.2f})"
                    + (f", {failures} failed" if failures else ""),
                    f"sent at {np.median(rates):,.0f} req/s", target, ok))
    return section


@dataclass
class Stage:
    """One stage of the exposure's work, measured alone in one thread: seconds for every spectrum."""

    name: str
    seconds: float
    spectra: int


def compute_stages(repository: Path, spectra: list, per_message: int = 64, device: str = "cpu") -> list[Stage]:
    """The exposure's own work, stage by stage, each in one thread on the sessions the server
    loads (same repository, same threads per session): the checks of the raw spectra, each
    distinct preprocessing recipe of the default models (resampling and normalisation, once per
    recipe as the analyser does) and each model's session runs on the prepared messages of
    ``per_message`` spectra. Their sum is the single-core work of the exposure."""
    from specserve.runtime.embedded.analysis import Analyzer, Staged
    from specserve.runtime.embedded.providers import resolve_device, single_threaded_numpy
    from specserve.runtime.engine.memory import return_freed_memory
    from specserve.runtime.engine.repository import load_repository
    from specserve.runtime.pipeline import checked

    single_threaded_numpy()  # as the server has it: one thread means one thread
    return_freed_memory()  # and the server's allocator settings (they set the preprocessing's speed)
    models = load_repository(repository, resolve_device(device))
    chosen = Analyzer(models).resolve(None)
    messages = [spectra[i:i + per_message] for i in range(0, len(spectra), per_message)]
    stages = []
    t0 = time.perf_counter()
    valid = [[checked(s) for s in message] for message in messages]
    stages.append(Stage("checks of the raw arrays", time.perf_counter() - t0, len(spectra)))
    prepared = {}
    for model in chosen:
        recipe = model.card.preprocessing
        if recipe in prepared:
            continue
        t0 = time.perf_counter()
        batches = [Staged.of(recipe, message).used for message in valid]  # as the analyser does
        prepared[recipe] = batches = [b for b in batches if b is not None]
        names = ", ".join(m.name for m in chosen if m.card.preprocessing == recipe)
        stages.append(Stage(f"preprocessing for {names} ({recipe.grid.length:,}-pixel grid)",
                            time.perf_counter() - t0, sum(len(b) for b in batches)))
    for model in chosen:
        batches = prepared[model.card.preprocessing]
        feeds = []
        for batch in batches:
            inputs = {"flux": batch.model_flux()}
            if "ivar" in model.card.contract.input_names:
                inputs["ivar"] = batch.model_ivar()
            feeds.append(model.prepare(inputs))
        if feeds:
            model.execute(feeds[0])  # warm-up
        t0 = time.perf_counter()
        for feed in feeds:
            model.execute(feed)
        stages.append(Stage(f"{model.name} session runs (batches of up to {per_message})",
                            time.perf_counter() - t0, sum(len(b) for b in batches)))
    return stages


def exposure(repository: Path, spectra: list, n: int = 4000, device: str = "cpu") -> Section:
    """``n`` spectra (cycled) through the client library at its defaults, every model; against
    the exposure's own compute ceiling (:func:`compute_stages` on the same spectra, divided by
    the cores)."""
    from specserve.runtime.client import Client
    from specserve.runtime.spectrum import SpectrumInput

    cycled = [SpectrumInput(f"{s.id}#{i}", s.wavelength, s.flux, s.ivar, s.mask, s.redshift, s.metadata)
              for i, s in ((i, spectra[i % len(spectra)]) for i in range(n))]
    cores = os.cpu_count() or 1
    stages = compute_stages(repository, cycled, device=device)
    work = sum(stage.seconds for stage in stages)
    ceiling = work / cores if device == "cpu" else work
    with server_process(repository, device) as address:
        with Client(address) as client:
            list(client.stream(cycled[:64]))  # warm-up
            t0 = time.perf_counter()
            rows = list(client.stream(cycled))
            seconds = time.perf_counter() - t0
    answered = sum(r.ok for r in rows)
    if len(rows) != n:
        raise SpecserveError(f"{len(rows)} rows for {n} spectra")
    section = Section("One LAMOST exposure through the full pipeline")
    ran: dict[str, int] = {}
    for row in rows:
        for note in row.notes:
            ran.setdefault(note.split(":")[0], 0)
        for model in row.models:
            ran[model.split(":")[0]] = ran.get(model.split(":")[0], 0) + 1
    section.notes.append("spectra each model answered (for the others it reported not applicable, with the reason): "
                         + (", ".join(f"{m} {k:,}" for m, k in sorted(ran.items())) or "none"))
    section.notes.append(
        "compute ceiling: the stages below, each measured alone in one thread on the same spectra "
        f"before the server started, summed ({work:.2f} s of work)"
        + (f" and divided by the {cores} cores" if device == "cpu" else "")
        + "; the wall time adds the client, gRPC and the scheduling of the stages")
    section.rows.append(Row(
        f"{n:,} spectra (the kit's {len(spectra)} LAMOST DR1 files cycled), every model, one stream, "
        "client defaults (64 per message)",
        f"{seconds:.2f} s wall, {n / seconds:,.0f} spectra/s ({answered:,} answered)",
        f"{seconds / 6:.2f} of 6 s", f"< 6 s on {cores} CPU cores" if device == "cpu" else "",
        verdict(seconds < 6 and answered == n) if device == "cpu" else ""))
    section.rows.append(Row(
        "against its own compute ceiling",
        f"ceiling {ceiling:.2f} s; wall {seconds:.2f} s", f"{ceiling / seconds:.0%} of the ceiling", ">= 70 %",
        verdict(ceiling / seconds >= 0.7)))
    for stage in stages:
        per = (f"{stage.seconds / stage.spectra * 1e3:.3f} ms per spectrum" if stage.spectra
               else "every spectrum turned away by its wavelength span")
        section.rows.append(Row(f"stage: {stage.name}", f"{stage.seconds:.3f} s for {stage.spectra:,} spectra",
                                f"{per}; {stage.seconds / work:.0%} of the work"))
    return section


if __name__ == "__main__":
    if len(sys.argv) in (3, 4) and sys.argv[1] == "echo":
        asyncio.run(_echo(sys.argv[2], skeleton=sys.argv[3:] == ["--skeleton"]))
    else:
        sys.exit("usage: python -m specserve.export.bench.serving echo RESPONSE_FILE [--skeleton]")
