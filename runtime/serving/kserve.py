"""The KServe v2 / Triton ``GRPCInferenceService``: tensors in, tensors out, through each
model's batcher."""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import time
from collections.abc import AsyncIterator, Coroutine
from importlib import metadata

import grpc
import numpy as np

from specserve.protos.kserve import service_pb2 as kserve
from specserve.protos.kserve import service_pb2_grpc as kserve_grpc
from specserve.runtime import dtypes
from specserve.runtime.contract import DYNAMIC_DIMS
from specserve.runtime.engine.repository import LoadedModel
from specserve.runtime.engine.store import ModelStore
from specserve.runtime.errors import (
    ContractError,
    InvalidInputError,
    ModelControlError,
    ModelLoadError,
)
from specserve.runtime.serving.decoding import Undecodable
from specserve.runtime.serving.health import sync_health
from specserve.runtime.serving.status import (
    call_deadline,
    log_request,
    redact,
    request_id,
    status_for,
    unary,
)
from specserve.runtime.serving.streams import STREAM_WINDOW, STREAM_WINDOW_BYTES, StreamCut, answer_in_order, ready_value

log = logging.getLogger(__name__)

SERVER_NAME = "specserve"
EXTENSIONS = ("model_repository", "model_configuration", "statistics")
"""Triton's names of the protocol extensions this servicer implements (ServerMetadata): the
repository RPCs (index, load, unload), ModelConfig and ModelStatistics. Shared memory, trace,
logging, sequence batching and classification are not implemented and answer UNIMPLEMENTED."""


def _version() -> str:
    try:
        return metadata.version("specserve")
    except metadata.PackageNotFoundError:
        return "0+unknown"



# ------------------------------------------------------------------ KServe v2


def _decode_inputs(request: kserve.ModelInferRequest) -> dict[str, np.ndarray]:
    inputs, raw = request.inputs, request.raw_input_contents
    if raw:
        if len(raw) != len(inputs):
            raise InvalidInputError(f"{len(raw)} raw_input_contents for {len(inputs)} inputs")
        typed = [t.name for t in inputs if t.HasField("contents")]
        if typed:  # as Triton: one way of sending the tensors per request
            raise InvalidInputError(f"contents must not be given with raw_input_contents (input {typed[0]!r})")
    arrays: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(inputs):
        dtype = _wire_dtype(tensor.datatype, tensor.name)
        shape = tuple(tensor.shape)
        count = 1
        for d in shape:
            if d < 0:
                raise InvalidInputError(f"input {tensor.name!r} has a negative dimension {list(shape)}")
            count *= d
        if raw:
            data = raw[i]
            if len(data) != count * dtype.itemsize:
                raise InvalidInputError(
                    f"input {tensor.name!r}: {len(data)} bytes for shape {list(shape)} of {tensor.datatype} "
                    f"(expected {count * dtype.itemsize})"
                )
            array = np.frombuffer(data, dtype=dtype)  # read-only, no copy
            if not dtype.isnative:
                array = array.astype(dtype.newbyteorder("="))
        else:
            array = np.asarray(_typed_contents(tensor), dtype=dtype.newbyteorder("="))
            if array.size != count:
                raise InvalidInputError(f"input {tensor.name!r}: {array.size} values for shape {list(shape)}")
        arrays[tensor.name] = array.reshape(shape)
    return arrays


@functools.lru_cache(maxsize=None)
def _little_endian(name: str) -> np.dtype:
    return dtypes.from_kserve(name).numpy.newbyteorder("<")


def _wire_dtype(name: str, tensor: str) -> np.dtype:
    """The numpy dtype of a KServe datatype as it is on the wire (little-endian)."""
    try:
        return _little_endian(name)
    except ContractError as exc:
        raise InvalidInputError(f"input {tensor!r}: {exc}") from None


def _typed_contents(tensor):
    field = {
        "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
        "INT64": "int64_contents", "UINT8": "uint_contents", "FP32": "fp32_contents", "FP64": "fp64_contents",
    }.get(tensor.datatype)
    if field is None:
        raise InvalidInputError(f"input {tensor.name!r}: {tensor.datatype} must be sent in raw_input_contents")
    return list(getattr(tensor.contents, field))


def infer_start(store: ModelStore, request: kserve.ModelInferRequest,
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
        log_request("ModelInfer", rid, target, rows, t0, exc)
        raise

    async def finish() -> kserve.ModelInferResponse:
        try:
            outputs = await future
        except Exception as exc:
            log_request("ModelInfer", rid, target, rows, t0, exc)
            raise
        response = kserve.ModelInferResponse(model_name=model.name, model_version=model.version, id=rid)
        for name in wanted:
            array = np.ascontiguousarray(outputs[name])
            response.outputs.add(name=name, datatype=dtypes.from_numpy(array.dtype).kserve, shape=list(array.shape))
            little = array if array.dtype.byteorder != ">" else array.astype(array.dtype.newbyteorder("<"))
            response.raw_output_contents.append(little.tobytes())
        log_request("ModelInfer", rid, target, rows, t0)
        return response

    return finish()




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
    def __init__(self, store: ModelStore, stopping: asyncio.Event, health_servicer, model_control: str = "none",
                 window: tuple[int, int] = (STREAM_WINDOW, STREAM_WINDOW_BYTES)):
        self.store = store
        self.window = window
        """A stream's messages, and bytes, in flight at once (:func:`.streams.answer_in_order`)."""
        self.stopping = stopping
        self.health = health_servicer
        self.model_control = model_control

    def _check_model_control(self) -> None:
        if self.model_control != "explicit":
            raise ModelControlError("model control is off on this server (Triton's mode 'none'); start it with "
                                    "--model-control explicit to load and unload models")

    async def _sync_health(self) -> None:
        await sync_health(self.health, self.store, self.stopping.is_set())

    @unary
    async def ServerLive(self, request, context):
        return kserve.ServerLiveResponse(live=True)

    @unary
    async def ServerReady(self, request, context):
        return kserve.ServerReadyResponse(ready=any(m.ready for m in self.store.models.values()))

    @unary
    async def ModelReady(self, request, context):
        failed = self.store.failures.get(request.name)
        if failed and request.version == failed[0]:
            return kserve.ModelReadyResponse(ready=False)  # the version that failed; the reason is in the index
        return kserve.ModelReadyResponse(ready=self.store.get(request.name, request.version).ready)

    @unary
    async def ModelStatistics(self, request, context):
        if request.name:
            models = [self.store.get(request.name, request.version)]
        else:
            models = [m for _, m in sorted(self.store.models.items()) if m.ready]
        return kserve.ModelStatisticsResponse(model_stats=[_statistics(m) for m in models])

    @unary
    async def RepositoryIndex(self, request, context):
        return kserve.RepositoryIndexResponse(models=[
            kserve.RepositoryIndexResponse.ModelIndex(name=n, version=v, state=state, reason=redact(reason))
            for n, v, state, reason in self.store.index() if not request.ready or state == "READY"])

    @unary
    async def RepositoryModelLoad(self, request, context):
        self._check_model_control()
        model = await asyncio.to_thread(self.store.reload, request.model_name)
        await self._sync_health()
        failed = self.store.failures.get(request.model_name)
        if not model.ready:
            raise ModelLoadError(f"model {request.model_name!r} did not load: {model.reason}")
        if failed:
            raise ModelLoadError(f"model {request.model_name!r} version {failed[0]} did not load: {failed[1]} "
                                     f"(version {model.version} keeps serving)")
        return kserve.RepositoryModelLoadResponse()

    @unary
    async def RepositoryModelUnload(self, request, context):
        self._check_model_control()
        self.store.unload(request.model_name)
        await self._sync_health()
        return kserve.RepositoryModelUnloadResponse()

    @unary
    async def ServerMetadata(self, request, context):
        return kserve.ServerMetadataResponse(name=SERVER_NAME, version=_version(), extensions=list(EXTENSIONS))

    @unary
    async def ModelConfig(self, request, context):
        model = self.store.ready_model(request.name, request.version)
        return kserve.ModelConfigResponse(config=model.config)

    @unary
    async def ModelMetadata(self, request, context):
        model = self.store.ready_model(request.name, request.version)
        contract, dims = model.card.contract, model.card.dims
        return kserve.ModelMetadataResponse(
            name=model.name, versions=[model.version], platform="onnxruntime_onnx",
            inputs=[_tensor_metadata(t, dims) for t in contract.inputs],
            outputs=[_tensor_metadata(t, dims) for t in contract.outputs],
        )

    @unary
    async def ModelInfer(self, request, context):
        return await infer_start(self.store, request, call_deadline(context))

    async def ModelStreamInfer(self, request_iterator, context) -> AsyncIterator[kserve.ModelStreamInferResponse]:
        deadline = call_deadline(context)
        index = itertools.count()

        def in_band(exc: BaseException, rid: str, model: str = "") -> kserve.ModelStreamInferResponse:
            code, message = status_for(exc)
            return kserve.ModelStreamInferResponse(error_message=f"{code.name}: {message}",
                                                   infer_response=kserve.ModelInferResponse(id=rid, model_name=model))

        async def answer(finish, rid: str, model: str) -> kserve.ModelStreamInferResponse:
            try:
                return kserve.ModelStreamInferResponse(infer_response=await finish)
            except Exception as exc:  # noqa: BLE001 - reported in-band, the stream goes on
                return in_band(exc, rid, model)

        def start(request):
            number = next(index)
            if isinstance(request, Undecodable):  # no id could be read: the message's index says which
                return ready_value(in_band(request.error(context.peer(), f"(stream message {number})"),
                                           f"message {number}"))
            try:
                return answer(infer_start(self.store, request, deadline), request.id, request.model_name)
            except Exception as exc:  # noqa: BLE001 - reported in-band, the stream goes on
                return ready_value(in_band(exc, request.id, request.model_name))

        last_id = ""
        try:
            async for response in answer_in_order(request_iterator, start, self.stopping, *self.window):
                last_id = response.infer_response.id
                yield response
        except StreamCut as cut:
            await context.abort(grpc.StatusCode.UNAVAILABLE, cut.message(last_id))
