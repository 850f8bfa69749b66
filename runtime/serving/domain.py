"""The ``specserve.v1`` domain API: spectra in, physical results out (through the engine's
analyzer)."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator

import grpc
import numpy as np

from specserve.protos import specserve_pb2 as pb
from specserve.protos import specserve_pb2_grpc as pb_grpc
from specserve.runtime.embedded.analysis import (
    ModelResult,
    SpectrumInput,
    SpectrumOutcome,
)
from specserve.runtime.engine.store import ModelStore
from specserve.runtime.errors import (
    InvalidSpectrumError,
)
from specserve.runtime.serving.decoding import Undecodable
from specserve.runtime.serving.status import (
    call_deadline,
    logged,
    request_id,
    status_for,
    unary,
)
from specserve.runtime.serving.streams import STREAM_WINDOW, STREAM_WINDOW_BYTES, StreamCut, answer_in_order
from specserve.runtime.wire import spectrum_from_proto

log = logging.getLogger(__name__)

def error_message(exc: BaseException) -> pb.Error:
    code, message = status_for(exc)
    return pb.Error(code=code.value[0], message=message)  # Error.Code numbers are gRPC's own



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
        message.error.CopyFrom(error_message(outcome.error))
    return message


def _analyze(store: ModelStore, request: pb.AnalyzeRequest, rid: str,
             deadline: float | None = None) -> list[pb.SpectrumResult]:
    models = ",".join(request.models) or "all"
    with logged("Analyze", rid, f"models={models}", len(request.spectra)):
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
                                           deadline=deadline, variant=request.variant))
    ordered = [early[i] if s is None else next(outcomes) for i, s in enumerate(inputs)]
    return [_outcome_to_proto(o, request.return_model_spectrum) for o in ordered]


class DomainServicer(pb_grpc.SpecServeServicer):
    def __init__(self, store: ModelStore, stopping: asyncio.Event,
                 window: tuple[int, int] = (STREAM_WINDOW, STREAM_WINDOW_BYTES)):
        self.store = store
        self.window = window
        """A stream's messages, and bytes, in flight at once (:func:`.streams.answer_in_order`)."""
        self.stopping = stopping

    @unary
    async def Analyze(self, request, context):
        if not request.spectra:
            raise InvalidSpectrumError("the request holds no spectra")
        rid = request_id(request.request_id)
        results = await asyncio.to_thread(_analyze, self.store, request, rid, call_deadline(context))
        return pb.AnalyzeResponse(request_id=rid, results=results)

    async def AnalyzeStream(self, request_iterator, context) -> AsyncIterator[pb.AnalyzeStreamResponse]:
        deadline = call_deadline(context)
        index = itertools.count()

        async def answer(request, number: int) -> pb.AnalyzeStreamResponse:
            if isinstance(request, Undecodable):  # no id could be read: the message's index says which
                error = request.error(context.peer(), f"(stream message {number})")
                return pb.AnalyzeStreamResponse(request_id=f"message {number}", error=error_message(error))
            rid = request_id(request.request_id)
            try:
                if not request.spectra:
                    raise InvalidSpectrumError("the message holds no spectra")
                results = await asyncio.to_thread(_analyze, self.store, request, rid, deadline)
            except Exception as exc:  # noqa: BLE001 - reported in-band, the stream goes on
                return pb.AnalyzeStreamResponse(request_id=rid, error=error_message(exc))
            return pb.AnalyzeStreamResponse(request_id=rid, results=results)

        last_id = ""
        try:
            async for response in answer_in_order(request_iterator,
                                                  lambda r: asyncio.ensure_future(answer(r, next(index))),
                                                  self.stopping, *self.window):
                last_id = response.request_id
                yield response
        except StreamCut as cut:
            await context.abort(grpc.StatusCode.UNAVAILABLE, cut.message(last_id))

    @unary
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



