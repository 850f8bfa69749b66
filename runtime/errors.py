"""Domain exceptions of specserve, in one place.

Every error the runtime raises on purpose derives from :class:`SpecserveError`. The gRPC layer maps
these classes to status codes in one table; command-line entry points turn them into an exit code
and a one-line message. Anything else that escapes is a bug.
"""

from __future__ import annotations


class SpecserveError(Exception):
    """Base class of every deliberate specserve error."""


class InvalidSpectrumError(SpecserveError, ValueError):
    """Spectrum arrays that cannot be processed: wrong shapes, non-monotonic wavelengths,
    nothing usable, values outside what the operation accepts."""


class GridError(InvalidSpectrumError):
    """A wavelength-grid description that is malformed or inconsistent."""


class SpectrumReadError(SpecserveError, OSError):
    """A file that is not a readable spectrum: missing, truncated, of an unknown layout,
    or holding no usable flux. The message always names the file and the reason."""

    def __init__(self, path: object, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class DatasetError(SpecserveError):
    """A benchmark set that cannot be built or loaded (missing data kit, unknown name...)."""


class ContractError(SpecserveError):
    """A model file, session or request that does not match the declared model contract
    (missing metadata, wrong input names, dtypes or shapes)."""


class InvalidInputError(SpecserveError, ValueError):
    """Request tensors that do not fit the model's contract (a client error)."""


class ExportError(SpecserveError):
    """An exported ONNX model that failed validation (checker, op types, contract, parity)."""


class ModelNotFoundError(SpecserveError, LookupError):
    """A model (or model repository) that does not exist."""


class ModelNotReadyError(SpecserveError):
    """A model that exists but could not be loaded; the message gives the reason."""


class ModelLoadError(SpecserveError):
    """A model (version) that a repository request asked to load did not load; the reason is given."""


class QueueFullError(SpecserveError):
    """A model's request queue is full: the server is at capacity, retry later (RESOURCE_EXHAUSTED)."""


class DeadlineExceededError(SpecserveError):
    """A request's deadline passed before its batch ran; it was not run (DEADLINE_EXCEEDED)."""


class ShuttingDownError(SpecserveError):
    """A model's batcher is closed (the server is stopping or the model was replaced) (UNAVAILABLE)."""


class ModelControlError(SpecserveError):
    """A repository load or unload request on a server whose model control is off (Triton's mode
    ``none``) (UNAVAILABLE)."""
