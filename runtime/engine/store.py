"""The model store: the loaded repository, every ready model behind its batcher, reloads and
unloads, and the analyzer over it."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from specserve.runtime.embedded.analysis import Analyzer
from specserve.runtime.embedded.providers import Device
from specserve.runtime.engine.memory import RequestMemory
from specserve.runtime.engine.repository import LoadedModel, load_model_dir, load_repository, lookup
from specserve.runtime.errors import (
    ModelNotFoundError,
)
from specserve.runtime.layout import check_model_name, folder_signature, model_folders

log = logging.getLogger(__name__)


class ModelStore:
    """The loaded repository and the analyzer over it. Every ready model has a batcher
    (:mod:`.batching`); a replaced or unloaded version's batcher answers what it holds, then
    stops."""

    def __init__(self, repository: str | Path, device: Device | None = None, memory: RequestMemory | None = None):
        self.repository = Path(repository)
        self.device = device or Device()
        self.memory = memory
        """Bytes of queued requests, server-wide, under its limit (None: unbounded)."""
        self.models: dict[str, LoadedModel] = load_repository(self.repository, self.device)
        for model in self.models.values():
            model.start_batching(memory)
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
        folder = self.repository / check_model_name(name)
        if not folder.is_dir():
            raise ModelNotFoundError(f"no model folder {name!r} in the repository")
        with self._lock:
            signature = folder_signature(folder)
            current = self.models.get(name)
            if current is not None and current.ready and self.signatures.get(name) == signature:
                return current  # unchanged on disk: nothing to reinstall
            n_models = max(1, len(model_folders(self.repository)))
            candidate = load_model_dir(folder, self.device, n_models)
            if (candidate.ready and current is not None and current.ready
                    and candidate.card.kind != current.card.kind):
                candidate = LoadedModel(name, candidate.version, None, reason=(
                    f"version {candidate.version} is a {candidate.card.kind} model, but {name!r} serves "
                    f"{current.card.kind} (version {current.version}); a model folder keeps its kind"))
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

    def shrink_arenas(self) -> None:
        """Every ready model's session gives back its arena's free chunks (after a burst)."""
        for model in list(self.models.values()):
            if model.ready and self.device.kind == "cpu" and self.device.memory_arena:
                model.shrink_arena()

    def unload(self, name: str) -> None:
        self.get(check_model_name(name))
        with self._lock:
            self._install(name, LoadedModel(name, "", None, reason="unloaded (RepositoryModelUnload)"))
            self.failures.pop(name, None)
            log.info("model %s unloaded", name)

    def _install(self, name: str, model: LoadedModel) -> None:
        old = self.models.get(name)
        model.start_batching(self.memory)
        self.models[name] = model
        if old is not None and old is not model and old.batcher is not None:
            # its worker answers what it holds, then exits; a request that was being admitted to it
            # goes to the new version (none when unloaded or removed: that request is refused)
            old.batcher.close(wait=False, successor=model.batcher if model.ready else None)

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
        return lookup(self.models, name, version, ready=False)

    def ready_model(self, name: str, version: str = "") -> LoadedModel:
        return lookup(self.models, name, version)


