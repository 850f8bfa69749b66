"""The gRPC server: KServe v2 inference protocol, the ``specserve.v1`` domain API, health and
reflection, on grpc.aio with ONNX Runtime sessions run off the event loop.

The servicers only translate protobuf <-> domain objects (:mod:`.analysis`, :mod:`.repository`).
Domain errors become status codes in one table, :func:`status_for`. Anything unexpected becomes
``INTERNAL`` with a generic message, and its traceback goes to the log. Stream RPCs report a bad
message in-band (``error_message`` / ``error``) and go on serving the next ones.

``create_server(repository, address)`` returns ``(server, port)``, so tests can bind port 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import itertools
import logging
import math
import signal
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from specserve.protos import grpc_service_pb2 as kserve
from specserve.protos import grpc_service_pb2_grpc as kserve_grpc
from specserve.protos import specserve_pb2 as pb
from specserve.protos import specserve_pb2_grpc as pb_grpc

from . import dtypes, metrics
from .analysis import Analyzer, ModelResult, SpectrumInput, SpectrumOutcome
from .domain_codec import spectrum_from_proto
from .contract import DYNAMIC_DIMS
from .errors import (
    ContractError,
    DeadlineExceededError,
    InvalidInputError,
    InvalidSpectrumError,
    ModelLoadError,
    ModelNotFoundError,
    ModelNotReadyError,
    QueueFullError,
    ShuttingDownError,
    SpecserveError,
)
from .providers import Device
from .repository import LoadedModel, folder_signature, load_model_dir, load_repository, model_folders

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 256 * 1024 * 1024
SERVER_NAME = "specserve"

_STATUS: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (InvalidSpectrumError, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidInputError, grpc.StatusCode.INVALID_ARGUMENT),
    (ModelNotFoundError, grpc.StatusCode.NOT_FOUND),
    (ModelNotReadyError, grpc.StatusCode.UNAVAILABLE),
    (ContractError, grpc.StatusCode.FAILED_PRECONDITION),
    (ModelLoadError, grpc.StatusCode.FAILED_PRECONDITION),
    (QueueFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DeadlineExceededError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (ShuttingDownError, grpc.StatusCode.UNAVAILABLE),
)

SWITCH_INTERVAL_S = 0.001
STREAM_WINDOW = 64
"""Messages of one stream in flight at once (their answers still go back in order)."""

def _code(exc: BaseException) -> grpc.StatusCode:
    return next((code for cls, code in _STATUS if isinstance(exc, cls)), grpc.StatusCode.INTERNAL)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The one place where errors become gRPC status codes and client-facing messages."""
    code = _code(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.error("internal error", exc_info=exc)
        return code, "internal error (see the server log)"
    return code, str(exc)


REQUEST_LOG = logging.getLogger("specserve.requests")
"""One line per inference request (``specserve serve --log-requests`` shows them)."""


_ID_PREFIX = uuid.uuid4().hex[:4]
_ID_COUNTER = itertools.count()


def request_id(given: str) -> str:
    """The client's request id, or a new one (returned in the response, so logs can be matched):
    12 hex digits, a random per-process prefix and a counter (cheaper than a uuid per request)."""
    return given or f"{_ID_PREFIX}{next(_ID_COUNTER) & 0xFFFFFFFF:08x}"


def _log_request(kind: str, rid: str, target: str, n: int, t0: float, exc: BaseException | None = None) -> None:
    """Log the request ``rid`` on ``target`` with ``n`` rows/spectra: its status and duration."""
    if not REQUEST_LOG.isEnabledFor(logging.INFO):
        return
    ms = (time.perf_counter() - t0) * 1e3
    if exc is None:
        REQUEST_LOG.info("%s id=%s %s n=%d OK %.1f ms", kind, rid, target, n, ms)
    else:
        REQUEST_LOG.info("%s id=%s %s n=%d %s %.1f ms: %s", kind, rid, target, n, _code(exc).name, ms,
                         " ".join(str(exc).split())[:300])


@contextlib.contextmanager
def _logged(kind: str, rid: str, target: str, n: int):
    """:func:`_log_request` around a block."""
    t0 = time.perf_counter()
    try:
        yield
    except Exception as exc:
        _log_request(kind, rid, target, n, t0, exc)
        raise
    _log_request(kind, rid, target, n, t0)


def _error_message(exc: BaseException) -> pb.Error:
    code, message = status_for(exc)
    return pb.Error(code=code.value[0], message=message)  # Error.Code numbers are gRPC's own


def _unary(handler: Callable) -> Callable:
    """Wrap a unary handler so that every exception goes through :func:`status_for`."""

    @functools.wraps(handler)
    async def wrapper(self, request, context: grpc.aio.ServicerContext):
        try:
            return await handler(self, request, context)
        except Exception as exc:  # noqa: BLE001 - mapped in one place
            code, message = status_for(exc)
            await context.abort(code, message)

    return wrapper


def _version() -> str:
    try:
        return metadata.version("specserve")
    except metadata.PackageNotFoundError:
        return "0+unknown"


class ModelStore:
    """The loaded repository and the analyzer over it. Every ready model has a batcher
    (:mod:`.batching`); a replaced or unloaded version's batcher answers what it holds, then
    stops."""

    def __init__(self, repository: str | Path, device: Device | None = None):
        self.repository = Path(repository)
        self.device = device or Device()
        self.models: dict[str, LoadedModel] = load_repository(self.repository, self.device)
        for model in self.models.values():
            model.start_batching()
        self.failures: dict[str, tuple[str, str]] = {
            name: m.newer_failure for name, m in self.models.items() if m.newer_failure}
        """Model name -> (version, reason) of a newer version that failed to load while an older one serves."""
        self.signatures = {name: folder_signature(self.repository / name) for name in self.models}
        self._lock = threading.Lock()
        self.analyzer = Analyzer(self.models)
        ready = [n for n, m in self.models.items() if m.ready]
        log.info("repository %s: %d models, ready: %s", self.repository, len(self.models), ", ".join(ready) or "none")

    def reload(self, name: str) -> LoadedModel:
        """Load model ``name`` again from the repository (its newest version that loads). If
        nothing loads, a model already serving keeps serving; the failure is kept with its reason."""
        folder = self.repository / name
        if name.startswith(".") or "/" in name or not folder.is_dir():
            raise ModelNotFoundError(f"no model folder {name!r} in {self.repository}")
        with self._lock:
            signature = folder_signature(folder)
            n_models = max(1, len(model_folders(self.repository)))
            candidate = load_model_dir(folder, self.device, n_models)
            current = self.models.get(name)
            if candidate.ready or current is None or not current.ready:
                self._install(name, candidate)
                failure = candidate.newer_failure
                if candidate.ready:
                    log.info("model %s: serving version %s", name, candidate.version)
            else:  # nothing loads: the newest version's failure is the candidate's reason
                failure = (candidate.version, candidate.reason)
                log.warning("model %s: reload failed (version %s keeps serving): %s", name, current.version,
                            candidate.reason)
            if failure:
                self.failures[name] = failure
            else:
                self.failures.pop(name, None)
            self.signatures[name] = signature
            return self.models[name]

    def unload(self, name: str) -> None:
        self.get(name)
        with self._lock:
            self._install(name, LoadedModel(name, "", None, reason="unloaded (RepositoryModelUnload)"))
            self.failures.pop(name, None)
            log.info("model %s unloaded", name)

    def _install(self, name: str, model: LoadedModel) -> None:
        old = self.models.get(name)
        model.start_batching()
        self.models[name] = model
        if old is not None and old is not model and old.batcher is not None:
            old.batcher.close(wait=False)  # its worker answers what it holds, then exits

    def close(self, timeout: float | None = None) -> None:
        """Stop every batcher after it has answered what it holds."""
        for model in list(self.models.values()):
            model.stop_batching(timeout)

    def changed(self) -> list[str]:
        """Model folders added, changed or removed since they were last loaded."""
        on_disk = {d.name: folder_signature(d) for d in model_folders(self.repository)} if self.repository.is_dir() else {}
        names = {n for n, sig in on_disk.items() if self.signatures.get(n) != sig}
        names |= {n for n in self.signatures if n not in on_disk}
        return sorted(names)

    def refresh(self) -> list[str]:
        """Reload every changed model folder (a removed one is unloaded); the names handled."""
        handled = self.changed()
        for name in handled:
            if (self.repository / name).is_dir():
                self.reload(name)
            else:
                with self._lock:
                    self._install(name, LoadedModel(name, "", None, reason="model folder removed"))
                    self.signatures.pop(name, None)
                    self.failures.pop(name, None)
                log.warning("model %s: folder removed, unloaded", name)
        return handled

    def index(self) -> list[tuple[str, str, str, str]]:
        """(name, version, state, reason) of every model and every failed newer version."""
        rows = []
        for name, model in sorted(self.models.items()):
            rows.append((name, model.version, "READY" if model.ready else "UNAVAILABLE", model.reason))
            if name in self.failures:
                version, reason = self.failures[name]
                rows.append((name, version, "UNAVAILABLE", reason))
        return rows

    def get(self, name: str, version: str = "") -> LoadedModel:
        model = self.models.get(name)
        if model is None:
            raise ModelNotFoundError(f"unknown model {name!r} (available: {', '.join(sorted(self.models))})")
        if version and version != model.version:
            raise ModelNotFoundError(f"model {name!r} has no loaded version {version!r} (serving {model.version!r})")
        return model

    def ready_model(self, name: str, version: str = "") -> LoadedModel:
        model = self.get(name, version)
        if not model.ready:
            raise ModelNotReadyError(f"model {name!r} is not ready: {model.reason}")
        return model


# ------------------------------------------------------------------ KServe v2


def _decode_inputs(request: kserve.ModelInferRequest) -> dict[str, np.ndarray]:
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidInputError(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
    arrays: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        dtype = _dtype(tensor.datatype, tensor.name)
        shape = tuple(int(d) for d in tensor.shape)
        if any(d < 0 for d in shape):
            raise InvalidInputError(f"input {tensor.name!r} has a negative dimension {list(shape)}")
        count = math.prod(shape)
        if raw:
            data = raw[i]
            if len(data) != count * dtype.numpy.itemsize:
                raise InvalidInputError(
                    f"input {tensor.name!r}: {len(data)} bytes for shape {list(shape)} of {dtype.kserve} "
                    f"(expected {count * dtype.numpy.itemsize})"
                )
            array = np.frombuffer(data, dtype=dtype.numpy.newbyteorder("<"))  # read-only, no copy
            if not array.dtype.isnative:
                array = array.astype(dtype.numpy)
        else:
            array = np.asarray(_typed_contents(tensor, dtype), dtype=dtype.numpy)
            if array.size != count:
                raise InvalidInputError(f"input {tensor.name!r}: {array.size} values for shape {list(shape)}")
        arrays[tensor.name] = array.reshape(shape)
    return arrays


def _dtype(name: str, tensor: str) -> dtypes.DType:
    try:
        return dtypes.from_kserve(name)
    except ContractError as exc:
        raise InvalidInputError(f"input {tensor!r}: {exc}") from None


def _typed_contents(tensor, dtype: dtypes.DType):
    field = {
        "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
        "INT64": "int64_contents", "UINT8": "uint_contents", "FP32": "fp32_contents", "FP64": "fp64_contents",
    }.get(dtype.kserve)
    if field is None:
        raise InvalidInputError(f"input {tensor.name!r}: {dtype.kserve} must be sent in raw_input_contents")
    return list(getattr(tensor.contents, field))


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline on the time.monotonic() clock (None: the client set none)."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _infer_start(store: ModelStore, request: kserve.ModelInferRequest,
                 deadline: float | None = None) -> Coroutine[None, None, kserve.ModelInferResponse]:
    """The synchronous half of a ModelInfer: check, decode and queue the request for its model's
    batcher (errors raise here, at once). Returns the coroutine that awaits the request's share of
    the batch run and builds the response. Streams queue each message as it is read, without a
    task per message."""
    rid = request_id(request.id)
    rows = int(request.inputs[0].shape[0]) if request.inputs and request.inputs[0].shape else 0
    target, t0 = f"model={request.model_name}", time.perf_counter()
    try:
        model = store.ready_model(request.model_name, request.model_version)
        names = model.card.contract.output_names
        wanted = [o.name for o in request.outputs] or names
        unknown = [n for n in wanted if n not in names]
        if unknown:
            raise InvalidInputError(f"model {model.name!r} has no outputs {unknown} (outputs: {names})")
        future = model.batcher.submit(_decode_inputs(request), deadline, asyncio.get_running_loop())
    except Exception as exc:
        _log_request("ModelInfer", rid, target, rows, t0, exc)
        raise

    async def finish() -> kserve.ModelInferResponse:
        try:
            outputs = await future
        except Exception as exc:
            _log_request("ModelInfer", rid, target, rows, t0, exc)
            raise
        response = kserve.ModelInferResponse(model_name=model.name, model_version=model.version, id=rid)
        for name in wanted:
            array = np.ascontiguousarray(outputs[name])
            response.outputs.add(name=name, datatype=dtypes.from_numpy(array.dtype).kserve, shape=list(array.shape))
            little = array if array.dtype.byteorder != ">" else array.astype(array.dtype.newbyteorder("<"))
            response.raw_output_contents.append(little.tobytes())
        _log_request("ModelInfer", rid, target, rows, t0)
        return response

    return finish()


async def _in_order(requests: AsyncIterator, start: Callable[[object], Awaitable], stopping: asyncio.Event,
                    window: int = STREAM_WINDOW) -> AsyncIterator:
    """Answer a stream's messages concurrently and yield the answers in the order the messages
    came. ``start(message)`` is called as each message is read: it queues the work and returns an
    awaitable of the answer, which reports its own errors in-band. Up to ``window`` messages are in
    flight, so the batcher can gather them. Once ``stopping`` is set (SIGTERM) no further message
    is read: the ones already read are answered and the stream ends with OK."""
    pending: asyncio.Queue = asyncio.Queue(maxsize=window)
    done = object()
    failed: list[Exception] = []

    async def read() -> None:
        try:
            async for message in requests:
                await pending.put(start(message))
        except asyncio.CancelledError:
            pass  # shutting down: read nothing more (a second cancel, from the finally below, ends it)
        except Exception as exc:  # noqa: BLE001 - raised by the consumer, after the answers so far
            failed.append(exc)
        await pending.put(done)

    reader = asyncio.create_task(read())
    stop = asyncio.ensure_future(stopping.wait())
    stop.add_done_callback(lambda f: None if f.cancelled() else reader.cancel())
    try:
        while (answer := await pending.get()) is not done:
            yield await answer
        if failed:  # a broken request stream
            raise failed[0]
    finally:
        stop.cancel()
        reader.cancel()
        while not pending.empty():
            answer = pending.get_nowait()
            if answer is not done:
                if asyncio.iscoroutine(answer):
                    answer.close()
                else:
                    answer.cancel()


async def _value(value):
    return value


def _tensor_metadata(spec, dims) -> kserve.ModelMetadataResponse.TensorMetadata:
    shape = [-1 if d in DYNAMIC_DIMS else int(d) for d in spec.resolve(dims)]
    return kserve.ModelMetadataResponse.TensorMetadata(
        name=spec.name, datatype=dtypes.from_name(spec.dtype).kserve, shape=shape)


def _statistics(model: LoadedModel) -> kserve.ModelStatistics:
    snap = model.stats.snapshot()
    duration = kserve.StatisticDuration
    return kserve.ModelStatistics(
        name=model.name, version=model.version, last_inference=snap["last_inference_ms"],
        inference_count=snap["inference_count"], execution_count=snap["execution_count"],
        inference_stats=kserve.InferStatistics(
            success=duration(count=snap["success"][0], ns=snap["success"][1]),
            fail=duration(count=snap["fail"][0], ns=snap["fail"][1]),
            queue=duration(count=snap["queue"][0], ns=snap["queue"][1]),
            compute_infer=duration(count=snap["compute"][0], ns=snap["compute"][1])),
        batch_stats=[kserve.InferBatchStatistics(batch_size=size, compute_infer=duration(count=count, ns=ns))
                     for size, (count, ns) in snap["batches"].items()])


class KServeServicer(kserve_grpc.GRPCInferenceServiceServicer):
    def __init__(self, store: ModelStore, stopping: asyncio.Event, health_servicer):
        self.store = store
        self.stopping = stopping
        self.health = health_servicer

    async def _sync_health(self) -> None:
        await sync_health(self.health, self.store, self.stopping.is_set())

    @_unary
    async def ServerLive(self, request, context):
        return kserve.ServerLiveResponse(live=True)

    @_unary
    async def ServerReady(self, request, context):
        return kserve.ServerReadyResponse(ready=any(m.ready for m in self.store.models.values()))

    @_unary
    async def ModelReady(self, request, context):
        failed = self.store.failures.get(request.name)
        if failed and request.version == failed[0]:
            return kserve.ModelReadyResponse(ready=False)  # the version that failed; the reason is in the index
        return kserve.ModelReadyResponse(ready=self.store.get(request.name, request.version).ready)

    @_unary
    async def ModelStatistics(self, request, context):
        if request.name:
            models = [self.store.get(request.name, request.version)]
        else:
            models = [m for _, m in sorted(self.store.models.items()) if m.ready]
        return kserve.ModelStatisticsResponse(model_stats=[_statistics(m) for m in models])

    @_unary
    async def RepositoryIndex(self, request, context):
        return kserve.RepositoryIndexResponse(models=[
            kserve.RepositoryIndexResponse.ModelIndex(name=n, version=v, state=state, reason=reason)
            for n, v, state, reason in self.store.index() if not request.ready or state == "READY"])

    @_unary
    async def RepositoryModelLoad(self, request, context):
        model = await asyncio.to_thread(self.store.reload, request.model_name)
        await self._sync_health()
        failed = self.store.failures.get(request.model_name)
        if not model.ready:
            raise ModelLoadError(f"model {request.model_name!r} did not load: {model.reason}")
        if failed:
            raise ModelLoadError(f"model {request.model_name!r} version {failed[0]} did not load: {failed[1]} "
                                     f"(version {model.version} keeps serving)")
        return kserve.RepositoryModelLoadResponse()

    @_unary
    async def RepositoryModelUnload(self, request, context):
        self.store.unload(request.model_name)
        await self._sync_health()
        return kserve.RepositoryModelUnloadResponse()

    @_unary
    async def ServerMetadata(self, request, context):
        return kserve.ServerMetadataResponse(name=SERVER_NAME, version=_version(), extensions=[])

    @_unary
    async def ModelMetadata(self, request, context):
        model = self.store.ready_model(request.name, request.version)
        contract, dims = model.card.contract, model.card.dims
        return kserve.ModelMetadataResponse(
            name=model.name, versions=[model.version], platform="onnxruntime_onnx",
            inputs=[_tensor_metadata(t, dims) for t in contract.inputs],
            outputs=[_tensor_metadata(t, dims) for t in contract.outputs],
        )

    @_unary
    async def ModelInfer(self, request, context):
        return await _infer_start(self.store, request, _deadline(context))

    async def ModelStreamInfer(self, request_iterator, context) -> AsyncIterator[kserve.ModelStreamInferResponse]:
        deadline = _deadline(context)

        def in_band(exc: BaseException) -> kserve.ModelStreamInferResponse:
            code, message = status_for(exc)
            return kserve.ModelStreamInferResponse(error_message=f"{code.name}: {message}")

        async def answer(finish) -> kserve.ModelStreamInferResponse:
            try:
                return kserve.ModelStreamInferResponse(infer_response=await finish)
            except Exception as exc:  # noqa: BLE001 - reported in-band, the stream goes on
                return in_band(exc)

        def start(request):
            try:
                return answer(_infer_start(self.store, request, deadline))
            except Exception as exc:  # noqa: BLE001 - reported in-band, the stream goes on
                return _value(in_band(exc))

        async for response in _in_order(request_iterator, start, self.stopping):
            yield response


# ------------------------------------------------------------------ specserve.v1


def _result_to_proto(result: ModelResult, model_spectrum: bool = False) -> pb.ModelResult:
    out = pb.ModelResult(model=result.model, version=result.version, applicable=result.applicable,
                         not_applicable_reason=result.reason, class_names=list(result.class_names))
    out.values.update(result.values)
    if result.probabilities is not None:
        out.probabilities.extend(float(p) for p in result.probabilities)
    if model_spectrum and result.model_spectrum is not None:
        out.model_spectrum.extend(np.asarray(result.model_spectrum, dtype=np.float32).tolist())
    return out


def _outcome_to_proto(outcome: SpectrumOutcome, model_spectrum: bool = False) -> pb.SpectrumResult:
    message = pb.SpectrumResult(id=outcome.id, results=[_result_to_proto(r, model_spectrum) for r in outcome.results])
    if outcome.error is not None:
        message.error.CopyFrom(_error_message(outcome.error))
    return message


def _analyze(store: ModelStore, request: pb.AnalyzeRequest, rid: str,
             deadline: float | None = None) -> list[pb.SpectrumResult]:
    models = ",".join(request.models) or "all"
    with _logged("Analyze", rid, f"models={models}", len(request.spectra)):
        return _analyze_logged(store, request, deadline)


def _analyze_logged(store: ModelStore, request: pb.AnalyzeRequest, deadline: float | None) -> list[pb.SpectrumResult]:
    inputs: list[SpectrumInput | None] = []
    early: dict[int, SpectrumOutcome] = {}
    for i, message in enumerate(request.spectra):
        try:
            inputs.append(spectrum_from_proto(message))
        except InvalidSpectrumError as exc:
            inputs.append(None)
            early[i] = SpectrumOutcome(message.id, error=exc)
    valid = [s for s in inputs if s is not None]
    outcomes = iter(store.analyzer.analyze(valid, list(request.models), mc_samples=int(request.mc_samples),
                                           deadline=deadline))
    ordered = [early[i] if s is None else next(outcomes) for i, s in enumerate(inputs)]
    return [_outcome_to_proto(o, request.return_model_spectrum) for o in ordered]


class DomainServicer(pb_grpc.SpecServeServicer):
    def __init__(self, store: ModelStore, stopping: asyncio.Event):
        self.store = store
        self.stopping = stopping

    @_unary
    async def Analyze(self, request, context):
        if not request.spectra:
            raise InvalidSpectrumError("the request holds no spectra")
        rid = request_id(request.request_id)
        results = await asyncio.to_thread(_analyze, self.store, request, rid, _deadline(context))
        return pb.AnalyzeResponse(request_id=rid, results=results)

    async def AnalyzeStream(self, request_iterator, context) -> AsyncIterator[pb.AnalyzeStreamResponse]:
        deadline = _deadline(context)

        async def answer(request) -> pb.AnalyzeStreamResponse:
            rid = request_id(request.request_id)
            try:
                if not request.spectra:
                    raise InvalidSpectrumError("the message holds no spectra")
                results = await asyncio.to_thread(_analyze, self.store, request, rid, deadline)
            except Exception as exc:  # noqa: BLE001 - reported in-band, the stream goes on
                return pb.AnalyzeStreamResponse(request_id=rid, error=_error_message(exc))
            return pb.AnalyzeStreamResponse(request_id=rid, results=results)

        async for response in _in_order(request_iterator, lambda r: asyncio.ensure_future(answer(r)), self.stopping):
            yield response

    @_unary
    async def ListModels(self, request, context):
        models = []
        for name, model in sorted(self.store.models.items()):
            info = pb.ModelInfo(name=name, version=model.version, ready=model.ready, reason=model.reason)
            if model.card is not None:
                card = model.card
                info.metadata.update({"kind": card.kind, "classes": ",".join(card.class_names),
                                      "labels": ",".join(card.label_names), "units": ",".join(card.label_units)})
                mc = card.normalisation.get("mc_samples")
                if mc:
                    info.metadata.update({"mc_samples_default": str(mc["default"]), "mc_samples_max": str(mc["max"])})
            models.append(info)
        return pb.ListModelsResponse(models=models)


# ------------------------------------------------------------------ server


def create_server(repository: str | Path, address: str = "127.0.0.1:0",
                  device: Device | None = None) -> tuple[grpc.aio.Server, int]:
    """A configured, not yet started grpc.aio server and the port it is bound to; the models'
    sessions run on ``device`` (default the CPU), each behind its batcher."""
    store = ModelStore(repository, device)
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.so_reuseport", 0),  # a second server on a busy port must fail, not share it
    ])
    stopping = asyncio.Event()  # set on SIGTERM: open streams answer what they read, then end
    health_servicer = health.aio.HealthServicer()
    kserve_grpc.add_GRPCInferenceServiceServicer_to_server(KServeServicer(store, stopping, health_servicer), server)
    pb_grpc.add_SpecServeServicer_to_server(DomainServicer(store, stopping), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    services = (
        kserve.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
        pb.DESCRIPTOR.services_by_name["SpecServe"].full_name,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(services, server)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError:  # grpc's "Failed to bind"
        port = 0
    if port == 0:
        raise SpecserveError(f"cannot listen on {address}: the port is in use or the address is not local")
    server.health_servicer = health_servicer  # type: ignore[attr-defined]
    server.store = store  # type: ignore[attr-defined]
    server.stopping = stopping  # type: ignore[attr-defined]
    metrics.track_models_ready(lambda: sum(m.ready for m in list(store.models.values())))
    return server, port


HEALTH_SERVICES = ("", "inference.GRPCInferenceService", "specserve.v1.SpecServe")
MODEL_HEALTH_PREFIX = "model/"
"""Each model's health has the service name ``model/<name>``: SERVING while it is ready."""


async def sync_health(health_servicer, store: ModelStore, stopping: bool = False) -> None:
    """The server's health (SERVING while any model is ready, NOT_SERVING while draining) and
    every model's (``model/<name>``), from the store as it is now."""
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    models = dict(store.models)
    overall = serving if not stopping and any(m.ready for m in models.values()) else not_serving
    for service in HEALTH_SERVICES:
        await health_servicer.set(service, overall)
    for name, model in models.items():
        await health_servicer.set(MODEL_HEALTH_PREFIX + name, serving if model.ready and not stopping else not_serving)


async def watch_repository(server, interval: float) -> None:
    """Every ``interval`` seconds reload the model folders that changed on disk (off the event loop)."""
    while True:
        await asyncio.sleep(interval)
        try:
            if await asyncio.to_thread(server.store.refresh):
                await sync_health(server.health_servicer, server.store)
        except Exception:  # noqa: BLE001 - a bad scan must not stop serving; the next one retries
            log.exception("repository scan failed")


async def serve(repository: str | Path, host: str = "127.0.0.1", port: int = 8001,
                grace_seconds: float = 10.0, on_started: Callable[[int], None] | None = None,
                device: Device | None = None, poll_repository: float = 2.0,
                metrics_port: int | None = None, on_metrics: Callable[[int], None] | None = None,
                metrics_required: bool = True) -> None:
    """Serve until SIGINT/SIGTERM, then stop accepting and finish what was accepted. Every
    ``poll_repository`` seconds (0: never) changed model folders are reloaded. With
    ``metrics_port`` (0: any free port) Prometheus metrics are served on ``host:metrics_port``;
    a busy port is an error when ``metrics_required``, else a warning."""
    server, bound = create_server(repository, f"{host}:{port}", device)
    if metrics_port is not None:
        try:
            bound_metrics = metrics.start_metrics_server(host, metrics_port)
        except OSError as exc:
            message = f"cannot serve metrics on {host}:{metrics_port}: {exc.strerror or exc}"
            if metrics_required:
                raise SpecserveError(message) from exc
            log.warning("%s; metrics are off (choose a port with --metrics-port)", message)
        else:
            log.info("metrics on http://%s:%d/metrics", host, bound_metrics)
            if on_metrics is not None:
                on_metrics(bound_metrics)
    await server.start()
    # everything loaded so far (modules, sessions, descriptors: several 100,000 objects) lives as
    # long as the server; out of the collector's sight, a full collection no longer stalls
    # requests for tens of milliseconds
    gc.collect()
    gc.freeze()
    # a batch worker whose session run ended waits for the GIL at most this long while the event
    # loop is busy (Python's default, 5 ms, showed up whole in the latency tail)
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    await sync_health(server.health_servicer, server.store)
    log.info("serving %s on %s:%d", repository, host, bound)
    if on_started is not None:
        on_started(bound)
    loop = asyncio.get_running_loop()
    # the domain API's threads mostly wait for their batches: allow many, so batches can fill
    loop.set_default_executor(ThreadPoolExecutor(max_workers=64, thread_name_prefix="specserve-request"))
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, server.stopping.set)
    watcher = asyncio.create_task(watch_repository(server, poll_repository)) if poll_repository > 0 else None
    await server.stopping.wait()  # set by the signal: open streams stop reading at once
    if watcher is not None:
        watcher.cancel()
    log.info("shutting down: draining for up to %.0f s", grace_seconds)
    await sync_health(server.health_servicer, server.store, stopping=True)
    await server.stop(grace_seconds)  # new calls are refused; accepted ones run to their answer
    await asyncio.to_thread(server.store.close, grace_seconds)
    log.info("stopped")
