"""The embedded runtime: a model repository analysed in-process, with numpy and onnxruntime only
(astropy to read FITS). The same pipeline as the server: readers, each model card's
preprocessing, ONNX Runtime sessions, the kinds' interpretation of the outputs, catalogue rows.
No gRPC, protobuf, Prometheus or torch is imported.

    from specserve.runtime.embedded.local import LocalRuntime

    runtime = LocalRuntime("models/", threads=1, memory_arena=False, variant="int8")
    rows = runtime.analyze_files(["spec-1.fits", "spec-2.fits"])      # [(file, Row), ...]
    outcomes = runtime.analyze([spectrum_input, ...], models=["rbm"])  # SpectrumOutcome objects

For small devices: ``threads`` (ONNX Runtime intra-op threads per session, default 1),
``memory_arena=False`` (no CPU arena kept between runs), and ``variant`` (``int8``, ``fp16``:
use ``<model>-<variant>`` wherever the repository has it).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from specserve.runtime.astro import as_input
from specserve.runtime.catalogue import Row, Sources
from specserve.runtime.embedded.analysis import Analyzer, SpectrumOutcome
from specserve.runtime.embedded.providers import Device
from specserve.runtime.embedded.session import SessionModel, load_repository
from specserve.runtime.errors import SpectrumReadError
from specserve.runtime.io import read_spectra
from specserve.runtime.spectrum import SpectrumInput


def row_of(outcome: SpectrumOutcome) -> Row:
    """One spectrum's outcome as a catalogue row (what the client builds from a server's answer)."""
    row = Row(outcome.id)
    if outcome.error is not None:
        row.error = str(outcome.error)
    for result in outcome.results:
        if result.applicable:
            row.models.append(f"{result.model}:{result.version}")
            row.values.update({k: float(v) for k, v in result.values.items()})
            if result.model_spectrum is not None:
                row.model_spectra[result.model] = result.model_spectrum
        else:
            row.notes.append(f"{result.model}: {result.reason}")
    return row


class LocalRuntime:
    """Every model of a repository folder in ONNX Runtime sessions of this process."""

    def __init__(self, repository: str | Path, *, threads: int = 1, memory_arena: bool = True,
                 variant: str | None = None, device: Device | None = None):
        self.repository = Path(repository)
        self.device = device or Device("cpu", intra_threads=max(1, threads), memory_arena=memory_arena)
        self.variant = variant or None
        self.models: dict[str, SessionModel] = load_repository(self.repository, self.device)
        self.analyzer = Analyzer(self.models)

    def analyze(self, spectra: Sequence[SpectrumInput], models: Sequence[str] = (),
                mc_samples: int = 0) -> list[SpectrumOutcome]:
        """Run the models on raw spectra, as the server's Analyze does: SpectrumInput objects, or
        anything :func:`~specserve.runtime.astro.as_input` takes (specutils spectra, astropy
        Quantities and Tables)."""
        return self.analyzer.analyze([as_input(s) for s in spectra], list(models), mc_samples=mc_samples,
                                     variant=self.variant or "")

    def analyze_files(self, paths: Iterable[str | Path], models: Sequence[str] = (), mc_samples: int = 0,
                      batch: int = 64, on_unreadable=None) -> list[tuple[str, Row]]:
        """Read spectrum files and analyse them in batches of ``batch`` spectra: ``(file, row)``
        pairs in file order. An unreadable file is skipped (``on_unreadable(path, reason)`` is told)."""
        return [pair for pairs in self.iter_files(paths, models, mc_samples, batch, on_unreadable) for pair in pairs]

    def iter_files(self, paths: Iterable[str | Path], models: Sequence[str] = (), mc_samples: int = 0,
                   batch: int = 64, on_unreadable=None) -> Iterator[list[tuple[str, Row]]]:
        """:meth:`analyze_files` one batch at a time, reading the files as it goes (an archive's
        list is never held): each batch's ``(file, row)`` pairs as soon as they are answered."""
        batch = max(1, batch)
        sources, spectra = Sources(), []
        for path in paths:
            try:
                items = read_spectra(path)
            except SpectrumReadError as exc:
                if on_unreadable is not None:
                    on_unreadable(str(path), exc.reason)
                continue
            spectra += [sources.add(spectrum, path) for spectrum in items]
            while len(spectra) >= batch:
                head, spectra = spectra[:batch], spectra[batch:]
                yield sources.pair([row_of(o) for o in self.analyze(head, models, mc_samples)])
        if spectra:
            yield sources.pair([row_of(o) for o in self.analyze(spectra, models, mc_samples)])

