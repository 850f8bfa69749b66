"""Python client of the ``specserve.v1`` API and the catalogue writer behind ``specserve analyze``.

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
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from specserve.protos import specserve_pb2 as pb
from specserve.protos import specserve_pb2_grpc as pb_grpc

from .spectrum import Spectrum, SpectrumInput

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "localhost:8001"
MAX_MESSAGE_BYTES = 256 * 1024 * 1024


@dataclass
class Row:
    """One spectrum's results, flattened for a catalogue."""

    id: str
    values: dict[str, float] = field(default_factory=dict)
    models: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str = ""
    model_spectra: dict[str, np.ndarray] = field(default_factory=dict)
    """Model name -> its reconstruction on its grid (when asked for and produced)."""

    @property
    def ok(self) -> bool:
        return not self.error


LOG_LINEAR_RTOL = 1e-10
"""Wavelengths that 10 ** (start + step * i) reproduces this closely are sent as a grid."""


def log_linear(wave: np.ndarray) -> tuple[float, float] | None:
    """(start, step) in log10 Angstrom when ``wave`` is a log-linear grid (to LOG_LINEAR_RTOL),
    else None."""
    if wave.ndim != 1 or wave.size < 3 or not np.all(wave > 0) or not np.all(np.isfinite(wave)):
        return None
    log_wave = np.log10(wave)
    start, step = float(log_wave[0]), float((log_wave[-1] - log_wave[0]) / (wave.size - 1))
    if not step > 0:
        return None
    rebuilt = 10.0 ** (start + step * np.arange(wave.size))
    return (start, step) if np.max(np.abs(rebuilt - wave) / wave) <= LOG_LINEAR_RTOL else None


def to_proto(item) -> pb.Spectrum:
    """A Spectrum, SpectrumInput or (id, wavelength, flux[, ivar]) tuple as a proto message (a
    message already built is passed through). Sent compactly, meaning the same to the server:
    log-linear wavelengths as a grid, masked pixels as ivar 0 when there is an ivar."""
    if isinstance(item, pb.Spectrum):
        return item
    if isinstance(item, Spectrum):
        item = SpectrumInput.from_spectrum(item)
    if isinstance(item, tuple):
        item = SpectrumInput(str(item[0]), *item[1:])
    flux = np.asarray(item.flux, dtype=np.float32)
    ivar = None if item.ivar is None else np.asarray(item.ivar, dtype=np.float32)
    mask = None if item.mask is None or not np.any(item.mask) else np.asarray(item.mask, dtype=bool)
    if mask is not None and ivar is not None and mask.shape == ivar.shape == flux.shape:
        # ivar 0 marks an unusable pixel just as the mask does, and is cheaper to send and read
        ivar, flux, mask = np.where(mask, np.float32(0), ivar), np.where(mask, np.float32(0), flux), None
    message = pb.Spectrum(id=item.id, flux=flux.tolist())
    wave = np.asarray(item.wavelength, dtype=np.float64)
    grid = log_linear(wave)
    if grid is not None:  # two numbers instead of 8 bytes per pixel, and no list to convert
        message.grid.start, message.grid.step, message.grid.length = grid[0], grid[1], wave.size
    else:
        message.wavelength.values.extend(wave.tolist())
    if ivar is not None:
        message.ivar.extend(ivar.tolist())
    if mask is not None:  # an all-usable mask says nothing
        message.mask.extend(mask.tolist())
    if item.redshift is not None:
        message.redshift = float(item.redshift)
    if item.source_fwhm is not None:
        message.source_fwhm = float(item.source_fwhm)
    elif item.source_resolution is not None:
        message.source_resolution = float(item.source_resolution)
    message.metadata.update({str(k): str(v) for k, v in item.metadata.items()})
    return message


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
                model_spectrum: bool = False) -> list[Row]:
        """Analyse spectra in one request. ``mc_samples``: Monte Carlo samples for the models that
        draw them (0: each model's default); ``model_spectrum``: also return reconstructions."""
        request = pb.AnalyzeRequest(spectra=[to_proto(s) for s in spectra], models=list(models),
                                    mc_samples=mc_samples, return_model_spectrum=model_spectrum)
        response = self.stub.Analyze(request, timeout=self.timeout)
        return [row_from_proto(r) for r in response.results]

    def stream(self, spectra: Iterable, models: Sequence[str] = (), batch_size: int = 64,
               timeout: float | None = None, mc_samples: int = 0) -> Iterator[Row]:
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
                                            mc_samples=mc_samples)
                    number += 1
                    batch = []
            if batch:
                yield pb.AnalyzeRequest(request_id=f"{stream_id}-{number}", spectra=batch, models=list(models),
                                        mc_samples=mc_samples)

        for response in self.stub.AnalyzeStream(requests(), timeout=timeout):
            if response.HasField("error"):
                raise StreamError(f"message {response.request_id}: {response.error.message}")
            for result in response.results:
                yield row_from_proto(result)


class StreamError(RuntimeError):
    """The server rejected a whole stream message (reported in-band)."""


def catalogue_table(rows: Sequence[tuple[str, Row]]):
    """``(file, row)`` pairs as an astropy Table: file, id, one float column per value (NaN where a
    row has none), models, notes."""
    from astropy.table import Table

    value_names = sorted({k for _, row in rows for k in row.values})
    table = Table()
    table["file"] = [f for f, _ in rows]
    table["id"] = [row.id for _, row in rows]
    for name in value_names:
        table[name] = np.array([row.values.get(name, np.nan) for _, row in rows], dtype=np.float64)
    table["models"] = [";".join(row.models) for _, row in rows]
    table["notes"] = ["; ".join(row.notes + ([row.error] if row.error else [])) for _, row in rows]
    return table


def catalogue_format(path: str | Path) -> str:
    """astropy's format for a catalogue path: FITS for .fits/.fit, CSV otherwise."""
    return "fits" if Path(path).suffix.lower() in (".fits", ".fit") else "ascii.csv"


def write_catalogue(path: str | Path, rows: Sequence[tuple[str, Row]]) -> None:
    """Write ``(file, row)`` pairs as CSV, or as a FITS table when the name ends in .fits/.fit."""
    catalogue_table(rows).write(Path(path), format=catalogue_format(path), overwrite=True)
