"""``specserve watch DIR --out CATALOGUE``: stream every spectrum file that appears in a folder to
a server and append the results to a catalogue as they arrive.

The catalogue (FITS table for ``.fits``, Parquet for ``.parquet``, ECSV for ``.ecsv``, CSV
otherwise; read back with its ids and notes as text, whatever they hold) and a rejects file
(``CATALOGUE.rejects.tsv``: path, reason) are the whole state. A file is done when its rows are
in the catalogue (or its journal) or its line is in the rejects file. On start both are read and
those files are skipped, so a restart resumes without duplicating or losing rows:

- each batch's rows are appended as they arrive, never the whole catalogue rewritten: a CSV or
  ECSV catalogue grows in place, a FITS or Parquet one through a journal beside it
  (``.CATALOGUE.rows.ecsv``) that is written into the catalogue when watch stops
  (:class:`~specserve.runtime.catalogue.CatalogueWriter`);
- a file whose results were not yet written is sent again after the restart.

A file is taken once its size and modification time have not changed between two scans, so files
still being copied in are not read half-written. Unreadable files go to the rejects file with the
reason and the stream goes on. A server that cannot be reached (or is busy) is retried every
``--poll`` seconds. ``--once`` handles what is there and exits (code 1, the files left to do, when
the server cannot be reached); otherwise it runs until Ctrl-C or SIGTERM, finishing the batch in
hand.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc

from specserve.runtime.catalogue import CatalogueWriter, Provenance, Row, Sources
from specserve.runtime.client.client import Client, Credentials, StreamError
from specserve.runtime.errors import SpecserveError, SpectrumReadError
from specserve.runtime.io import read_spectra
from specserve.runtime.spectrum import SpectrumInput

log = logging.getLogger(__name__)

REJECTS_SUFFIX = ".rejects.tsv"


class WatchState:
    """What is done: the catalogue (a :class:`~specserve.runtime.catalogue.CatalogueWriter`,
    resumed) and the rejected files."""

    def __init__(self, catalogue: Path, rejects: Path | None = None):
        self.catalogue = Path(catalogue)
        self.rejects = Path(rejects) if rejects else Path(str(catalogue) + REJECTS_SUFFIX)
        self.writer = CatalogueWriter(self.catalogue, resume=True)
        self.done: set[str] = set(self.writer.files)
        self.n_rejected = 0
        if self.rejects.exists():
            for line in self.rejects.read_text().splitlines():
                if line.strip():
                    self.done.add(line.split("\t", 1)[0])
                    self.n_rejected += 1

    @classmethod
    def load(cls, catalogue: Path, rejects: Path | None = None) -> WatchState:
        return cls(catalogue, rejects)

    @property
    def n_rows(self) -> int:
        return self.writer.n_rows

    @property
    def provenance(self) -> Provenance | None:
        """The served models, for the catalogue's units, descriptions and metadata (set by the watcher)."""
        return self.writer.provenance

    @provenance.setter
    def provenance(self, value: Provenance | None) -> None:
        self.writer.provenance = value

    def reject(self, path: str, reason: str) -> None:
        with open(self.rejects, "a") as f:
            f.write(f"{path}\t{' '.join(reason.split())}\n")
            f.flush()
            os.fsync(f.fileno())
        self.done.add(path)
        self.n_rejected += 1

    def append(self, rows: Sequence[tuple[str, Row]]) -> None:
        """Add rows to the catalogue (appended: see CatalogueWriter)."""
        self.writer.add(rows)
        self.done.update(f for f, _ in rows)

    def close(self) -> None:
        """The catalogue's final form: FITS and Parquet written from their journal, ECSV's metadata."""
        self.writer.close()


class Watcher:
    def __init__(self, folder: Path, state: WatchState, server: str, *, models: Sequence[str] = (),
                 pattern: str = "*", poll: float = 1.0, batch_files: int = 64, mc_samples: int = 0,
                 out: Callable[[str], None] | None = None, credentials: Credentials | None = None):
        if not folder.is_dir():
            raise SpecserveError(f"{folder} is not a folder")
        if poll <= 0:
            raise SpecserveError(f"--poll must be > 0 seconds, got {poll}")
        self.folder = folder
        self.state = state
        self.server = server
        self.credentials = credentials
        self.models = list(models)
        self.pattern = pattern
        self.poll = poll
        self.batch_files = batch_files
        self.mc_samples = mc_samples
        self.out = out or (lambda text: print(text, file=sys.stderr, flush=True))
        self.stop = threading.Event()
        self._seen: dict[str, tuple[int, float]] = {}
        self._t0 = time.perf_counter()
        self._spectra = 0
        self.once = False

    def ready_files(self) -> list[str]:
        """New files whose size and mtime did not change since the previous scan, oldest first."""
        ready, current = [], {}
        skip = {self.state.catalogue.resolve(), self.state.rejects.resolve()}
        for path in self.folder.glob(self.pattern):
            name = str(path)
            if name in self.state.done or not path.is_file() or path.name.startswith(".") or path.resolve() in skip:
                continue
            try:
                st = path.stat()
            except OSError:
                continue
            current[name] = (st.st_size, st.st_mtime)
            if self._seen.get(name) == current[name]:
                ready.append((st.st_mtime, name))
        self._seen = current
        return [name for _, name in sorted(ready)]

    def run(self, once: bool = False) -> int:
        """Watch until stopped (or, with ``once``, until nothing new is left); returns an exit code."""
        self.once = once
        while not self.stop.is_set():
            files = self.ready_files()
            if not files:
                if once and not self._seen:
                    return 0
                self.stop.wait(self.poll if not once else min(self.poll, 0.2))
                continue
            for lo in range(0, len(files), self.batch_files):
                if self.stop.is_set():
                    break
                if not self._process(files[lo:lo + self.batch_files]):
                    return 1
        return 0

    def _process(self, files: list[str]) -> bool:
        """Read, send and record one batch of files; False on an error that retrying cannot fix."""
        spectra: list[SpectrumInput] = []
        sources = Sources()
        for name in files:
            try:
                items = read_spectra(name)
            except SpectrumReadError as exc:
                self.state.reject(name, exc.reason)
                log.warning("rejected %s: %s", name, exc.reason)
                self.out(f"specserve watch: rejected {name}: {exc.reason}")
                continue
            spectra += [sources.add(spectrum, name) for spectrum in items]
        if not spectra:
            return True
        while not self.stop.is_set():
            try:
                with Client(self.server, credentials=self.credentials) as client:
                    if self.state.provenance is None:
                        self.state.provenance = client.provenance()
                    rows = list(client.stream(spectra, models=self.models, mc_samples=self.mc_samples))
                break
            except StreamError as exc:  # the server refused the request itself (unknown model...)
                self.out(f"specserve watch: error: {exc}")
                return False
            except grpc.RpcError as exc:
                if not self.once and exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                                                    grpc.StatusCode.RESOURCE_EXHAUSTED):
                    self.out(f"specserve watch: server {self.server}: {exc.code().name}; retrying in {self.poll:.0f} s")
                    self.stop.wait(max(self.poll, 1.0))
                    continue
                self.out(f"specserve watch: error: server {self.server}: {exc.code().name}: {exc.details()}")
                return False
        else:
            return True  # stopped while waiting for the server: these files stay to do
        try:
            paired = sources.pair(rows)
        except SpecserveError as exc:
            self.out(f"specserve watch: error: {exc}")
            return False
        self.state.append(paired)
        self._spectra += len(rows)
        rate = self._spectra / max(time.perf_counter() - self._t0, 1e-9)
        self.out(f"specserve watch: +{len(files)} files, {len(rows)} spectra; catalogue {self.state.n_rows} rows, "
                 f"{self.state.n_rejected} rejected files, {rate:.1f} spectra/s")
        return True


def watch(folder: Path, catalogue: Path, server: str, *, rejects: Path | None = None, once: bool = False,
          **options) -> int:
    """The ``specserve watch`` command: resume from ``catalogue`` and watch ``folder``."""
    state = WatchState.load(catalogue, rejects)
    watcher = Watcher(Path(folder), state, server, **options)
    watcher.out(f"specserve watch: {folder} -> {catalogue} ({state.n_rows} rows and {state.n_rejected} "
                f"rejected files already done)")
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: watcher.stop.set())
    try:
        code = watcher.run(once=once)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        state.close()
    watcher.out(f"specserve watch: stopped; catalogue {state.n_rows} rows, {state.n_rejected} rejected files")
    return code
