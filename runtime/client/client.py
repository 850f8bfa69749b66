"""Python client of the ``specserve.v1`` API.

``Client.analyze`` sends spectra in one request. ``Client.stream`` sends them over one
``AnalyzeStream`` in batches and yields results as they come back. Both accept
:class:`~.spectrum.Spectrum` objects (from :func:`~.io.read_spectra`),
:class:`~.spectrum.SpectrumInput` objects, ``(id, wavelength, flux[, ivar])`` tuples of numpy
arrays (wavelengths in vacuum Angstrom), and the astronomy objects that
:func:`specserve.runtime.astro.as_input` converts: specutils ``Spectrum``/``Spectrum1D`` objects,
``([id,] wavelength, flux[, ivar])`` tuples of astropy Quantities and astropy Tables, with
wavelengths in any spectral unit (nm, micron, GHz...) taken as vacuum, flux in its own unit, the
uncertainty as inverse variance, the mask and a specutils redshift. ``(id, obj)`` names one.
Results come back as :class:`Row` objects: the spectrum id, one plain value per result
(``p_cv``, ``free_energy_cv``...), the models used, and any error or not-applicable note.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from specserve.protos import specserve_pb2 as pb
from specserve.protos import specserve_pb2_grpc as pb_grpc
from specserve.runtime.catalogue import Provenance, Row
from specserve.runtime.errors import SpecserveError
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


TOKEN_ENV = "SPECSERVE_TOKEN"


@dataclass(frozen=True)
class Credentials:
    """How a client proves itself to a protected server (docs/security.md): TLS with the CA that
    signed the server's certificate (``tls_ca``; None with ``tls``: the system's roots), a client
    certificate for mutual TLS, and a bearer token."""

    tls: bool = False
    tls_ca: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    token: str | None = None

    @classmethod
    def from_options(cls, tls_ca: Path | None = None, client_cert: Path | None = None,
                     client_key: Path | None = None, token_file: Path | None = None,
                     tls: bool = False) -> Credentials:
        """From command-line options; the token from ``token_file`` (its first line), else from
        ``$SPECSERVE_TOKEN``. Errors name the file and the problem, never the token."""
        if (client_cert is None) != (client_key is None):
            raise SpecserveError("--tls-client-cert and --tls-client-key go together")
        token = None
        if token_file is not None:
            try:
                lines = Path(token_file).read_text().split()
            except OSError as exc:
                raise SpecserveError(f"cannot read the token file {token_file}: {exc.strerror or exc}") from None
            if not lines:
                raise SpecserveError(f"the token file {token_file} is empty")
            token = lines[0]
        else:
            token = os.environ.get(TOKEN_ENV) or None
        return cls(tls or tls_ca is not None or client_cert is not None, tls_ca, client_cert, client_key, token)

    def channel(self, address: str, options: Sequence[tuple[str, object]]) -> grpc.Channel:
        if not self.tls:
            return grpc.insecure_channel(address, options=list(options))
        return grpc.secure_channel(address, self._ssl(), options=list(options))

    def aio_channel(self, address: str, options: Sequence[tuple[str, object]]) -> grpc.aio.Channel:
        """The same channel for asyncio callers (the load benchmarks)."""
        if not self.tls:
            return grpc.aio.insecure_channel(address, options=list(options))
        return grpc.aio.secure_channel(address, self._ssl(), options=list(options))

    def _ssl(self) -> grpc.ChannelCredentials:
        def read(path: Path | None, what: str) -> bytes | None:
            if path is None:
                return None
            try:
                return Path(path).read_bytes()
            except OSError as exc:
                raise SpecserveError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None

        return grpc.ssl_channel_credentials(read(self.tls_ca, "TLS CA"), read(self.client_key, "client key"),
                                            read(self.client_cert, "client certificate"))

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()


class Client:
    def __init__(self, address: str = DEFAULT_ADDRESS, timeout: float = 120.0,
                 credentials: Credentials | None = None):
        self.address = address
        self.timeout = timeout
        self.credentials = credentials or Credentials.from_options()
        self.channel = self.credentials.channel(address, options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ])
        self.metadata = self.credentials.metadata
        self.stub = pb_grpc.SpecServeStub(self.channel)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def list_models(self) -> list[pb.ModelInfo]:
        return list(self.stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout, metadata=self.metadata).models)

    def wait_until_ready(self, timeout: float = 10.0, poll: float = 0.5) -> list[str]:
        """Wait up to ``timeout`` seconds for the server to answer with at least one model ready;
        the ready models' names. :class:`SpecserveError` says which of the two it was not: no
        server answering at the address (UNAVAILABLE), or a server with no model ready (still
        loading, or every model failed: their reasons are given). Other refusals (a token, TLS)
        raise as gRPC errors."""
        deadline = time.monotonic() + timeout
        infos: list[pb.ModelInfo] = []
        while True:
            left = deadline - time.monotonic()
            try:  # wait_for_ready: the call waits for a connection instead of failing at once
                infos = list(self.stub.ListModels(pb.ListModelsRequest(), timeout=max(left, 0.05),
                                                  metadata=self.metadata, wait_for_ready=True).models)
            except grpc.RpcError as exc:
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise
                if time.monotonic() < deadline:
                    continue
                raise SpecserveError(f"no server answers at {self.address} after {timeout:g} s (UNAVAILABLE: is "
                                     "`specserve serve` running there, on that port?)") from None
            ready = [m.name for m in infos if m.ready]
            if ready:
                return ready
            if time.monotonic() >= deadline:
                reasons = "; ".join(f"{m.name}: {m.reason}" for m in infos if m.reason) or "none listed"
                raise SpecserveError(f"the server at {self.address} has no model ready after {timeout:g} s "
                                     f"(UNAVAILABLE: still loading, or every model failed: {reasons})")
            time.sleep(min(poll, max(deadline - time.monotonic(), 0)))

    def provenance(self) -> Provenance:
        """The served models' ``name:version`` and their value columns' units and descriptions,
        for the catalogue (from ListModels: the cards' kind, classes, labels and units)."""
        def listed(info: pb.ModelInfo, key: str) -> list[str]:
            return [v for v in info.metadata.get(key, "").split(",") if v]

        return Provenance.of((m.name, m.version, m.metadata.get("kind", ""), listed(m, "classes"),
                              listed(m, "labels"), listed(m, "units")) for m in self.list_models() if m.ready)

    def analyze(self, spectra: Iterable, models: Sequence[str] = (), mc_samples: int = 0,
                model_spectrum: bool = False, variant: str = "") -> list[Row]:
        """Analyse spectra in one request, one row each in order. ``spectra``: any of the forms of
        the module docstring (a specutils spectrum in nm or GHz, a QTable... are converted by
        :func:`specserve.runtime.astro.as_input`; several spectra in one 2-D flux are refused:
        split them with :func:`specserve.runtime.astro.as_inputs`). One that cannot be converted
        raises :class:`~specserve.runtime.errors.InvalidSpectrumError` before anything is sent.
        ``mc_samples``: Monte Carlo samples for the models that draw them (0: each model's
        default); ``model_spectrum``: also return reconstructions; ``variant``: run each model's
        ``int8``/``fp16`` variant."""
        request = pb.AnalyzeRequest(spectra=[to_proto(s) for s in spectra], models=list(models),
                                    mc_samples=mc_samples, return_model_spectrum=model_spectrum, variant=variant)
        response = self.stub.Analyze(request, timeout=self.timeout, metadata=self.metadata)
        return [row_from_proto(r) for r in response.results]

    def stream(self, spectra: Iterable, models: Sequence[str] = (), batch_size: int = 64,
               timeout: float | None = None, mc_samples: int = 0, variant: str = "") -> Iterator[Row]:
        """Send ``spectra`` over one AnalyzeStream, ``batch_size`` per message; yield rows in order.

        A stream has no deadline by default (a night's pipeline may keep one open); a server that
        goes away ends it with ``UNAVAILABLE``.

        ``spectra`` take the forms of :meth:`analyze` (converted by
        :func:`specserve.runtime.astro.as_input` as they are sent). One that cannot be converted
        (:class:`~specserve.runtime.errors.InvalidSpectrumError`, e.g. a wavelength in kg) ends the
        stream: the rows of the spectra before it are yielded, then the error is raised.

        A message the server rejects as a whole (e.g. an unknown model) raises
        :class:`StreamError` after the rows before it were yielded.
        """

        stream_id = uuid.uuid4().hex[:8]  # message ids "<stream>-<n>": unique in the server's request log
        unsendable: list[SpecserveError] = []  # raised here: gRPC would hide an error of the request iterator

        def requests() -> Iterator[pb.AnalyzeRequest]:
            batch: list[pb.Spectrum] = []
            number = 0
            for item in spectra:
                try:
                    batch.append(to_proto(item))
                except SpecserveError as exc:
                    unsendable.append(exc)
                    break
                if len(batch) == batch_size:
                    yield pb.AnalyzeRequest(request_id=f"{stream_id}-{number}", spectra=batch, models=list(models),
                                            mc_samples=mc_samples, variant=variant)
                    number += 1
                    batch = []
            if batch:
                yield pb.AnalyzeRequest(request_id=f"{stream_id}-{number}", spectra=batch, models=list(models),
                                        mc_samples=mc_samples, variant=variant)

        for response in self.stub.AnalyzeStream(requests(), timeout=timeout, metadata=self.metadata):
            if response.HasField("error"):
                raise StreamError(f"message {response.request_id}: {response.error.message}")
            for result in response.results:
                yield row_from_proto(result)
        if unsendable:
            raise unsendable[0]


class StreamError(RuntimeError):
    """The server rejected a whole stream message (reported in-band)."""
