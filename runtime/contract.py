"""Model contracts: the names, dtypes and shapes of every model's ONNX inputs and outputs, and
the metadata that makes a ``model.onnx`` self-describing.

A contract is declared once here. Export uses it to name the graph's inputs and outputs, to mark
dynamic axes and to build dummy inputs. The runtime uses it to check a loaded session and every
request. Shapes are tuples of ints and symbolic names. ``"batch"`` is always dynamic; other names
(``"n_pixels"``, ``"n_classes"``) are resolved from the model's :class:`ModelCard`.

A :class:`ModelCard` travels inside the ONNX file as ``metadata_props``: keys ``specserve.<field>``
with JSON values. It holds the contract version, the model kind, the preprocessing recipe
(wavelength grid included), class or label names and units, physical bounds, normalisation
constants, the training-data fingerprint and the metrics. The runtime needs nothing but the file.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from specserve.runtime import dtypes
from specserve.runtime.errors import ContractError, InvalidInputError
from specserve.runtime.preprocess import Preprocessing

CONTRACT_VERSION = "1"
BATCH = "batch"
N_SAMPLES = "n_samples"
DYNAMIC_DIMS = frozenset({BATCH, N_SAMPLES})
"""Named dimensions that vary from run to run (the rest are fixed by the model card)."""
METADATA_PREFIX = "specserve."
MASKED_PIXEL_FILL = 1.0
"""Value that unusable pixels of a continuum-normalised input spectrum take (the continuum)."""

Dim = int | str


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # a contract dtype name, see runtime.dtypes
    shape: tuple[Dim, ...]
    description: str = ""
    optional: bool = False
    """An input the runtime fills in when a request leaves it out (see :func:`fill_defaults`)."""
    bounded: bool = False
    """Values along the last axis are the card's labels and must lie within ``card.bounds``."""
    example: float | tuple[float, ...] | None = None
    """Valid values for dummy inputs (export, tests): a constant, or typical values along the last
    axis (each dummy value is one of them times a random factor around 1); None: random values around 1."""

    def __post_init__(self) -> None:
        dtypes.from_name(self.dtype)

    def resolve(self, dims: Mapping[str, int]) -> tuple[Dim, ...]:
        """Shape with every named dimension except the dynamic ones replaced by its value in ``dims``."""
        out: list[Dim] = []
        for d in self.shape:
            if isinstance(d, str) and d not in DYNAMIC_DIMS:
                if d not in dims:
                    raise ContractError(f"tensor {self.name!r}: dimension {d!r} is not known for this model")
                out.append(int(dims[d]))
            else:
                out.append(d)
        return tuple(out)


@dataclass(frozen=True)
class ModelContract:
    kind: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @functools.cached_property
    def _input_set(self) -> frozenset[str]:
        return frozenset(t.name for t in self.inputs)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """``dynamic_axes`` for ``torch.onnx.export``: every dynamic axis of every tensor."""
        return {
            t.name: {i: d for i, d in enumerate(t.shape) if d in DYNAMIC_DIMS}
            for t in self.inputs + self.outputs
            if DYNAMIC_DIMS & set(t.shape)
        }

    def dummy_inputs(self, dims: Mapping[str, int], batch: int, seed: int = 0) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        out = {}
        for t in self.inputs:
            shape = tuple(batch if d == BATCH else d for d in t.resolve(dims))
            if isinstance(t.example, tuple):
                base = np.broadcast_to(np.asarray(t.example, dtype=np.float64), shape)
                out[t.name] = (base * rng.normal(1.0, 0.05, size=shape)).astype(dtypes.from_name(t.dtype).numpy)
            elif t.example is not None:
                out[t.name] = np.full(shape, t.example, dtype=dtypes.from_name(t.dtype).numpy)
            else:
                out[t.name] = rng.normal(1.0, 0.1, size=shape).astype(dtypes.from_name(t.dtype).numpy)
        return out

    def validate_session(self, session, dims: Mapping[str, int]) -> None:
        """Check an onnxruntime session's inputs and outputs against the contract."""
        problems = []
        for kind, specs, actual in (
            ("input", self.inputs, session.get_inputs()),
            ("output", self.outputs, session.get_outputs()),
        ):
            by_name = {a.name: a for a in actual}
            expected = [t.name for t in specs]
            if sorted(by_name) != sorted(expected):
                problems.append(f"{kind}s are {sorted(by_name)}, the contract says {sorted(expected)}")
                continue
            for t in specs:
                a = by_name[t.name]
                if a.type != dtypes.from_name(t.dtype).onnx:
                    problems.append(f"{kind} {t.name!r} has type {a.type}, the contract says {t.dtype}")
                want = t.resolve(dims)
                got = tuple(a.shape)
                if len(got) != len(want):
                    problems.append(f"{kind} {t.name!r} has rank {len(got)}, the contract says {len(want)}")
                    continue
                for axis, (w, g) in enumerate(zip(want, got)):
                    if w in DYNAMIC_DIMS and isinstance(g, int):
                        problems.append(f"{kind} {t.name!r} axis {axis} is fixed to {g}, the contract says {w}")
                    elif isinstance(w, int) and g != w:
                        problems.append(f"{kind} {t.name!r} axis {axis} is {g}, the contract says {w}")
        if problems:
            raise ContractError(f"{self.kind} model does not match its contract: " + "; ".join(problems))

    def validate_inputs(self, arrays: Mapping[str, np.ndarray], dims: Mapping[str, int],
                        finite: bool = True) -> dict[str, np.ndarray]:
        """Check request tensors; returns them as contiguous arrays of the contract dtypes.

        Raises :class:`InvalidInputError` (a client error) naming the first problem. ``finite``
        False leaves the values of the batched float inputs to the caller (:meth:`check_finite`
        on the whole batch: the server's batcher checks each run's rows in one pass, off the
        event loop).
        """
        missing = [t.name for t in self.inputs if t.name not in arrays and not t.optional]
        unknown = [n for n in arrays if n not in self._input_set]
        if missing or unknown:
            raise InvalidInputError(
                f"{self.kind} expects inputs {self.input_names}; missing {missing}, unexpected {unknown}"
            )
        out: dict[str, np.ndarray] = {}
        batch: int | None = None
        for t in self.inputs:
            if t.name not in arrays:
                continue
            array = np.asarray(arrays[t.name])
            want = t.resolve(dims)
            if array.ndim != len(want):
                raise InvalidInputError(f"input {t.name!r} must have shape {list(want)}, got {list(array.shape)}")
            for axis, (w, g) in enumerate(zip(want, array.shape)):
                if w == BATCH:
                    if batch is not None and g != batch:
                        raise InvalidInputError(f"inputs disagree on the batch size ({batch} and {g})")
                    batch = g
                elif g != w:
                    raise InvalidInputError(f"input {t.name!r} axis {axis} must be {w}, got {g}")
            target = dtypes.from_name(t.dtype).numpy
            if array.dtype != target:
                if not np.can_cast(array.dtype, target, casting="same_kind"):
                    raise InvalidInputError(f"input {t.name!r} must be {t.dtype}, got {array.dtype}")
                array = array.astype(target)
            if array.dtype.kind == "f" and (finite or BATCH not in t.shape) and not _all_finite(array):
                raise InvalidInputError(_NOT_FINITE.format(t.name))
            out[t.name] = np.ascontiguousarray(array)
        if batch == 0:
            raise InvalidInputError("empty batch")
        return out

    def check_finite(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Raise :class:`InvalidInputError` naming the first batched float input of ``arrays``
        (checked inputs) that holds NaN or infinity."""
        for t in self.inputs:
            array = arrays.get(t.name)
            if array is not None and array.dtype.kind == "f" and BATCH in t.shape and not _all_finite(array):
                raise InvalidInputError(_NOT_FINITE.format(t.name))


_NOT_FINITE = "input {!r} contains NaN or infinite values"


_ZEROS: dict[tuple[int, str], np.ndarray] = {}


def _all_finite(array: np.ndarray) -> bool:
    """True when every value is finite: the dot product with zeros is 0 for finite values and
    NaN as soon as one is NaN or infinite (one BLAS call, several times faster than isfinite)."""
    flat = array.reshape(-1)
    key = (flat.size, flat.dtype.str)
    zeros = _ZEROS.get(key)
    if zeros is None:
        zeros = np.zeros(flat.size, flat.dtype)
        if len(_ZEROS) < 64:  # a few request sizes recur; others are not kept
            _ZEROS[key] = zeros
    with np.errstate(invalid="ignore"):  # inf * 0 is the NaN we look for
        return bool(np.isfinite(np.dot(flat, zeros)))


RBM_CONTRACT = ModelContract(
    kind="rbm",
    inputs=(
        TensorSpec("flux", "float32", (BATCH, "n_pixels"),
                   "continuum-normalised flux on the model grid, unusable pixels set to 1"),
    ),
    outputs=(
        TensorSpec("probabilities", "float32", (BATCH, "n_classes"), "softmax(-free_energy)"),
        TensorSpec("free_energy", "float32", (BATCH, "n_classes"), "free energy of each class's RBM"),
    ),
)

SPT_CONTRACT = ModelContract(
    kind="spt",
    inputs=(
        TensorSpec("flux", "float32", (BATCH, "n_pixels"),
                   "continuum-normalised flux on the model grid, unusable pixels set to 1"),
        TensorSpec(N_SAMPLES, "int64", (1,), "Monte Carlo dropout samples T per spectrum "
                   "(default and maximum in the card's normalisation.mc_samples)", optional=True, example=8),
        TensorSpec("seed", "float32", (1,), "shifts the dropout masks' uniform draws; pass a fresh random "
                   "number in [0, 1) per run (two sessions in one process otherwise draw the same masks)",
                   optional=True, example=0.25),
    ),
    outputs=(
        TensorSpec("mean", "float32", (BATCH, "n_labels"), "MC mean, exp(mean of log samples), physical units"),
        TensorSpec("std", "float32", (BATCH, "n_labels"), "calibrated MC standard deviation, physical units"),
        TensorSpec("samples", "float32", (N_SAMPLES, BATCH, "n_labels"), "the MC samples, physical units"),
    ),
)

PHYSFORMER_CONTRACT = ModelContract(
    kind="physformer",
    inputs=(
        TensorSpec("flux", "float32", (BATCH, "n_pixels"),
                   "continuum-normalised flux on the model grid, unusable pixels set to 1"),
        TensorSpec("ivar", "float32", (BATCH, "n_pixels"), "inverse variance of the normalised flux, 0 = unusable"),
        SPT_CONTRACT.inputs[1],
        SPT_CONTRACT.inputs[2],
    ),
    outputs=(
        TensorSpec("parameters", "float32", (BATCH, "n_labels"), "MC mean of Teff [K], logg, [Fe/H], inside the box"),
        TensorSpec("parameters_std", "float32", (BATCH, "n_labels"), "MC standard deviation of the parameters"),
        TensorSpec("reduced_chi2", "float32", (BATCH,), "reduced chi-square of model_spectrum against flux"),
        TensorSpec("model_spectrum", "float32", (BATCH, "n_pixels"), "normalised spectrum generated from the parameters"),
        TensorSpec("samples", "float32", (N_SAMPLES, BATCH, "n_labels"), "the MC samples of the parameters"),
    ),
)

PHYSFORMER_GENERATE_CONTRACT = ModelContract(
    kind="physformer-generate",
    inputs=(
        TensorSpec("parameters", "float32", (BATCH, "n_labels"), "Teff [K], logg, [Fe/H] inside the card's bounds",
                   bounded=True, example=(5500.0, 4.0, -0.3)),
    ),
    outputs=(
        TensorSpec("spectrum", "float32", (BATCH, "n_pixels"), "normalised spectrum on the model grid"),
    ),
)

CONTRACTS: dict[str, ModelContract] = {
    c.kind: c for c in (RBM_CONTRACT, SPT_CONTRACT, PHYSFORMER_CONTRACT, PHYSFORMER_GENERATE_CONTRACT)
}


def contract_for(kind: str) -> ModelContract:
    try:
        return CONTRACTS[kind]
    except KeyError:
        raise ContractError(f"unknown model kind {kind!r} (known: {', '.join(CONTRACTS)})") from None


@dataclass(frozen=True)
class ModelCard:
    """Everything the runtime needs to know about a model besides its graph."""

    kind: str
    preprocessing: Preprocessing
    class_names: tuple[str, ...] = ()
    label_names: tuple[str, ...] = ()
    label_units: tuple[str, ...] = ()
    bounds: dict[str, list[float]] = field(default_factory=dict)
    normalisation: dict[str, Any] = field(default_factory=dict)
    training_fingerprint: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    contract_version: str = CONTRACT_VERSION

    def __post_init__(self) -> None:
        contract_for(self.kind)

    @property
    def contract(self) -> ModelContract:
        return contract_for(self.kind)

    @property
    def dims(self) -> dict[str, int]:
        return {
            "n_pixels": self.preprocessing.grid.length,
            "n_classes": len(self.class_names),
            "n_labels": len(self.label_names),
        }

    def to_metadata_props(self) -> dict[str, str]:
        values = {
            "contract_version": self.contract_version,
            "kind": self.kind,
            "preprocessing": self.preprocessing.to_dict(),
            "class_names": list(self.class_names),
            "label_names": list(self.label_names),
            "label_units": list(self.label_units),
            "bounds": self.bounds,
            "normalisation": self.normalisation,
            "training_fingerprint": self.training_fingerprint,
            "metrics": self.metrics,
            "description": self.description,
        }
        return {METADATA_PREFIX + k: json.dumps(v, sort_keys=True) for k, v in values.items()}

    @classmethod
    def from_metadata_props(cls, props: Mapping[str, str]) -> "ModelCard":
        """Parse ``metadata_props``; raises :class:`ContractError` naming what is missing or wrong."""
        values: dict[str, Any] = {}
        for key, text in props.items():
            if not key.startswith(METADATA_PREFIX):
                continue
            try:
                values[key[len(METADATA_PREFIX):]] = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ContractError(f"metadata {key!r} is not valid JSON: {exc}") from exc
        for required in ("contract_version", "kind", "preprocessing"):
            if required not in values:
                raise ContractError(f"model metadata lacks {METADATA_PREFIX}{required}")
        if values["contract_version"] != CONTRACT_VERSION:
            raise ContractError(
                f"model contract version {values['contract_version']!r} is not supported (this runtime: {CONTRACT_VERSION})"
            )
        try:
            preprocessing = Preprocessing.from_dict(values["preprocessing"])
        except Exception as exc:
            raise ContractError(f"model metadata has an invalid preprocessing recipe: {exc}") from exc
        return cls(
            kind=str(values["kind"]),
            preprocessing=preprocessing,
            class_names=tuple(values.get("class_names", ())),
            label_names=tuple(values.get("label_names", ())),
            label_units=tuple(values.get("label_units", ())),
            bounds=dict(values.get("bounds", {})),
            normalisation=dict(values.get("normalisation", {})),
            training_fingerprint=str(values.get("training_fingerprint", "")),
            metrics=dict(values.get("metrics", {})),
            description=str(values.get("description", "")),
            contract_version=str(values["contract_version"]),
        )


def fill_defaults(card: ModelCard, arrays: Mapping[str, np.ndarray], rng: np.random.Generator
                  ) -> dict[str, np.ndarray]:
    """``arrays`` with the contract's optional inputs filled in and checked, and bounded inputs
    checked against the card's bounds.

    ``n_samples``: the card's ``normalisation.mc_samples.default`` when absent; a request may ask
    for 1 to ``normalisation.mc_samples.max`` (else :class:`InvalidInputError`). ``seed``: a fresh
    uniform number from ``rng`` when absent, so every run draws new dropout masks.
    """
    out = dict(arrays)
    names = {t.name for t in card.contract.inputs if t.optional}
    if N_SAMPLES in names:
        mc = card.normalisation.get("mc_samples", {})
        default, largest = int(mc.get("default", 1)), int(mc.get("max", 1))
        if N_SAMPLES not in out:
            out[N_SAMPLES] = np.array([default], dtype=np.int64)
        else:
            value = np.asarray(out[N_SAMPLES])
            if value.size != 1 or value.dtype.kind not in "iu":
                raise InvalidInputError(f"input {N_SAMPLES!r} must be one integer, got {value.dtype} {list(value.shape)}")
            if not 1 <= int(value.reshape(-1)[0]) <= largest:
                raise InvalidInputError(f"{N_SAMPLES} must be between 1 and {largest}, got {int(value.reshape(-1)[0])}")
    if "seed" in names and "seed" not in out:
        out["seed"] = np.array([rng.random()], dtype=np.float32)
    for t in card.contract.inputs:
        if t.bounded and t.name in out and card.bounds:
            values = np.asarray(out[t.name], dtype=np.float64)
            if values.ndim == 2 and values.shape[1] == len(card.label_names):
                for j, name in enumerate(card.label_names):
                    lo, hi = card.bounds[name]
                    bad = ~((values[:, j] >= lo) & (values[:, j] <= hi))
                    if bad.any():
                        raise InvalidInputError(f"{t.name}: {name} must be within [{lo:g}, {hi:g}]; "
                                                f"row {int(np.flatnonzero(bad)[0])} has {values[bad, j][0]:g}")
    return out


def fill_masked(flux: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Model input from a normalised spectrum: unusable pixels set to :data:`MASKED_PIXEL_FILL`."""
    return np.where(mask, np.float32(MASKED_PIXEL_FILL), flux).astype(np.float32)
