"""One table of what each model kind is: its contract, whether it analyses spectra, and how its
outputs become plainly named values (``p_cv``, ``age``/``age_err``, ``teff``...). The engine's
Analyzer, the domain API and embedded callers read kinds from here only.

To add a kind: its contract in :mod:`.contract`, then a row of :data:`KINDS`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from specserve.runtime.contract import CONTRACTS, ModelCard, ModelContract
from specserve.runtime.errors import ContractError, InvalidInputError

Interpreter = Callable[[ModelCard, Mapping[str, np.ndarray], int], dict[str, float]]
"""(card, the outputs of one run, a row) -> that row's named values."""
Columns = Callable[[tuple[str, ...], tuple[str, ...], tuple[str, ...]], dict[str, tuple[str, str]]]
"""(class names, label names, label units) -> each named value's (unit, description), for catalogues."""


def _rbm_values(card: ModelCard, outputs: Mapping[str, np.ndarray], row: int) -> dict[str, float]:
    values = {}
    for j, name in enumerate(card.class_names):
        values[f"p_{name}"] = float(outputs["probabilities"][row, j])
        values[f"free_energy_{name}"] = float(outputs["free_energy"][row, j])
    return values


def _rbm_columns(classes: tuple[str, ...], labels: tuple[str, ...], units: tuple[str, ...]) -> dict[str, tuple[str, str]]:
    out = {}
    for name in classes:
        out[f"p_{name}"] = ("", f"probability of class {name} (softmax of the negative free energies)")
        out[f"free_energy_{name}"] = ("", f"free energy of the spectrum under the class-{name} RBM")
    return out


def _estimate_columns(chi2: bool) -> Columns:
    def columns(classes: tuple[str, ...], labels: tuple[str, ...], units: tuple[str, ...]) -> dict[str, tuple[str, str]]:
        out = {}
        for name, unit in zip(labels, units + ("",) * (len(labels) - len(units))):
            out[name] = (unit, f"{name}: estimate (mean of the Monte Carlo dropout draws)")
            out[f"{name}_err"] = (unit, f"{name}: 1-sigma uncertainty (spread of the Monte Carlo dropout draws)")
        if chi2:
            out["reduced_chi2"] = ("", "reduced chi-square of the generated spectrum against the input (NaN without ivar)")
        out["n_samples"] = ("", "Monte Carlo dropout samples drawn")
        return out

    return columns


def _estimates(mean: str, std: str) -> Callable[[ModelCard, Mapping[str, np.ndarray], int], dict[str, float]]:
    """Interpreter of MC estimates: ``<label>`` and ``<label>_err`` per label (physical units),
    ``n_samples``, and ``reduced_chi2`` where the model reports one (NaN when the client sent no ivar)."""

    def values(card: ModelCard, outputs: Mapping[str, np.ndarray], row: int) -> dict[str, float]:
        out = {}
        for j, name in enumerate(card.label_names):
            out[name] = float(outputs[mean][row, j])
            out[f"{name}_err"] = float(outputs[std][row, j])
        if "reduced_chi2" in outputs:
            out["reduced_chi2"] = float(outputs["reduced_chi2"][row]) if outputs["_has_ivar"][row] else float("nan")
        out["n_samples"] = float(outputs["samples"].shape[0])
        return out

    return values


@dataclass(frozen=True)
class Kind:
    name: str
    contract: ModelContract
    interpret: Interpreter | None
    """None: the kind's outputs are not results of a spectrum (physformer-generate)."""
    columns: Columns | None = None
    """Unit and description of each value ``interpret`` gives."""
    mc_rows_per_run: int = 64
    """Rows of one session run of an MC model (each row is tiled n_samples times inside the graph):
    a run's working memory grows with it, its speed per row does not. PhysFormer at its default 32
    samples needs about 3.8 MB a row (64 rows: 240 MB, 707 ms; 16 rows: 59 MB, 175 ms, measured on
    one thread with the arena off); the SPT 0.2 MB."""

    @property
    def analyses_spectra(self) -> bool:
        """Takes a spectrum (``flux``) and gives named results: served by the domain API."""
        return self.interpret is not None and "flux" in self.contract.input_names


KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("rbm", CONTRACTS["rbm"], _rbm_values, _rbm_columns),
    Kind("spt", CONTRACTS["spt"], _estimates("mean", "std"), _estimate_columns(chi2=False)),
    Kind("physformer", CONTRACTS["physformer"], _estimates("parameters", "parameters_std"),
         _estimate_columns(chi2=True), mc_rows_per_run=16),
    Kind("physformer-generate", CONTRACTS["physformer-generate"], None),
)}


def kind_of(card: ModelCard) -> Kind:
    try:
        return KINDS[card.kind]
    except KeyError:
        raise ContractError(f"unknown model kind {card.kind!r} (known: {', '.join(KINDS)})") from None


VARIANTS = ("int8", "fp16")
"""Reduced-precision variants of a model, each its own model in the repository: ``<model>-<variant>``."""


def variant_of(name: str) -> str:
    """The variant a model name is ("" for a full-precision model)."""
    base, _, suffix = name.rpartition("-")
    return suffix if base and suffix in VARIANTS else ""


def with_variant(name: str, variant: str) -> str:
    """The model name of ``name``'s ``variant`` ("" leaves it)."""
    if variant and variant not in VARIANTS:
        raise InvalidInputError(f"unknown variant {variant!r} (known: {', '.join(VARIANTS)})")
    return f"{name}-{variant}" if variant else name
