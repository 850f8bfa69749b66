"""Python client of the ``specserve.v1`` API.

``Client.analyze`` sends spectra in one request. ``Client.stream`` sends them over one
``AnalyzeStream`` in batches and yields results as they come back. Both accept
:class:`~.spectrum.Spectrum` objects (from :func:`~.io.read_spectra`),
:class:`~.spectrum.SpectrumInput` objects, or ``(id, wavelength, flux[, ivar])`` tuples of numpy
arrays. Results come back as :class:`Row` objects: the spectrum id, one plain value per result
(``p_cv``, ``free_energy_cv``...), the models used, and any error or not-applicable note.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Iterator, Sequence

import grpc
import numpy as np

from specserve.protos import specserve_pb2 as pb
from specserve.protos import specserve_pb2_grpc as pb_grpc
from specserve.runtime.catalogue import Row
from specserve.runtime.wire import to_proto

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "localhost:8001"
MAX_MESSAGE_BYTES = 256 * 1024 * 1024


def row_from_proto(result: pb.SpectrumResult) -> Row:
    row = Row(result.id)
    if result.HasField("error"):
        row.error = result.error.message
    for model_result in result.results:
        if model_result.applicable:
            row.models.append(f"{model_result.model}:{model_result.version}")
            row.values.update(model_result.values)
            if len(model_result.model_spectrum):
                row.model_spectra[model_result.model] = np.asarray(model_result.model_spectrum, dtype=np.float32)
        else:
            row.notes.append(f"{model_result.model}: {model_result.not_applicable_reason}")
    return row


class Client:
    def __init__(self, address: str = DEFAULT_ADDRESS, timeout: float = 120.0):
        self.address = address
        self.timeout = timeout
        self.channel = grpc.insecure_channel(address, options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ])
        self.stub = pb_grpc.SpecServeStub(self.channel)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def list_models(self) -> list[pb.ModelInfo]:
        return list(self.stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout).models)

    def analyze(self, spectra: Iterable, models: Sequence[str] = (), mc_samples: int = 0,
                model_spectrum: bool = False, variant: str = "") -> list[Row]:
        """Analyse spectra in one request. ``mc_samples``: Monte Carlo samples for the models that
        draw them (0: each model's default); ``model_spectrum``: also return reconstructions;
        ``variant``: run each model's ``int8``/``fp16`` variant."""
        request = pb.AnalyzeRequest(spectra=[to_proto(s) for s in spectra], models=list(models),
                                    mc_samples=mc_samples, return_model_spectrum=model_spectrum, variant=variant)
        response = self.stub.Analyze(request, timeout=self.timeout)
        return [row_from_proto(r) for r in response.results]

    def stream(self, spectra: Iterable, models: Sequence[str] = (), batch_size: int = 64,
               timeout: float | None = None, mc_samples: int = 0, variant: str = "") -> Iterator[Row]:
        """Send ``spectra`` over one AnalyzeStream, ``batch_size`` per message; yield rows in order.

        A stream has no deadline by default (a night's pipeline may keep one open); a server that
        goes away ends it with ``UNAVAILABLE``.

        A message the server rejects as a whole (e.g. an unknown model) raises
        :class:`StreamError` after the rows before it were yielded.
        """

        stream_id = uuid.uuid4().hex[:8]  # message ids "<stream>-<n>": unique in the server's request log

        def requests() -> Iterator[pb.AnalyzeRequest]:
            batch: list[pb.Spectrum] = []
            number = 0
            for item in spectra:
                batch.append(to_proto(item))
                if len(batch) == batch_size:
                    yield pb.AnalyzeRequest(request_id=f"{stream_id}-{number}", spectra=batch, models=list(models),
                                            mc_samples=mc_samples, variant=variant)
                    number += 1
                    batch = []
            if batch:
                yield pb.AnalyzeRequest(request_id=f"{stream_id}-{number}", spectra=batch, models=list(models),
                                        mc_samples=mc_samples, variant=variant)

        for response in self.stub.AnalyzeStream(requests(), timeout=timeout):
            if response.HasField("error"):
                raise StreamError(f"message {response.request_id}: {response.error.message}")
            for result in response.results:
                yield row_from_proto(result)


class StreamError(RuntimeError):
    """The server rejected a whole stream message (reported in-band)."""
