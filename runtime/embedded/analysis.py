"""The domain data plane: raw spectra in, per-model results out, no protobufs.

The gRPC servicer, the in-process API and the benchmarks all call :meth:`Analyzer.analyze`.
Each spectrum arrives on its own wavelengths. For every requested model, the spectrum goes
through that model's preprocessing recipe (from the model card), then the ONNX session runs on a
batch. The outputs are turned into plainly named values by the model kind's interpreter.

Failures stay with the spectrum that caused them. A spectrum with bad arrays gets an
``InvalidSpectrumError`` in its own outcome while the others are analysed. A model whose grid a
spectrum does not cover is reported as not applicable, with the reason.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from specserve.runtime.contract import N_SAMPLES
from specserve.runtime.embedded.session import SessionModel, lookup
from specserve.runtime.errors import (
    InvalidInputError,
    InvalidSpectrumError,
    SpecserveError,
)
from specserve.runtime.kinds import kind_of, variant_of, with_variant
from specserve.runtime.pipeline import MIN_COVERAGE, Prepared, checked, prepare, span_coverage
from specserve.runtime.preprocess import Preprocessing
from specserve.runtime.spectrum import SpectrumInput

__all__ = ["Analyzer", "ModelResult", "SpectrumInput", "SpectrumOutcome", "MIN_COVERAGE"]

log = logging.getLogger(__name__)

_POOL = ThreadPoolExecutor(max_workers=32, thread_name_prefix="specserve-model")
"""Runs the models of one request side by side."""

@dataclass
class ModelResult:
    model: str
    version: str
    applicable: bool
    reason: str = ""
    values: dict[str, float] = field(default_factory=dict)
    class_names: tuple[str, ...] = ()
    probabilities: np.ndarray | None = None
    model_spectrum: np.ndarray | None = None


@dataclass
class SpectrumOutcome:
    id: str
    results: list[ModelResult] = field(default_factory=list)
    error: SpecserveError | None = None


def _analyses_spectra(model: SessionModel) -> bool:
    return model.card is not None and kind_of(model.card).analyses_spectra


def _side_by_side(work, items: list) -> list:
    """``[work(item) for item in items]``, on the pool when there is more than one."""
    if len(items) < 2:
        return [work(item) for item in items]
    return [f.result() for f in [_POOL.submit(work, item) for item in items]]


@dataclass
class Staged:
    """The valid spectra of a request through one recipe (:meth:`of`; also what the exposure
    benchmark times as a stage): which ones cover its grid (``owners``,
    with their prepared rows ``used`` and model inputs) and which do not (``not_covering``:
    spectrum index and coverage). Every model with this recipe reads the same one."""

    not_covering: list[tuple[int, float]]
    owners: list[int]
    used: Prepared | None

    @classmethod
    def of(cls, recipe: Preprocessing, valid: Sequence[SpectrumInput | None]) -> "Staged":
        # a spectrum whose wavelength span cannot cover enough of the grid is turned away before
        # its preprocessing (the span bounds the coverage from above); the rest are checked exactly
        not_covering, index = [], []
        for i, s in enumerate(valid):
            if s is None:
                continue
            span = span_coverage(recipe, s)
            if span < MIN_COVERAGE:
                not_covering.append((i, span))
            else:
                index.append(i)
        if not index:
            return cls(not_covering, [], None)
        prepared = prepare(recipe, [valid[i] for i in index])
        coverage = prepared.coverage
        not_covering += [(index[row], float(coverage[row])) for row in np.flatnonzero(coverage < MIN_COVERAGE)]
        keep = np.flatnonzero(coverage >= MIN_COVERAGE)
        return cls(not_covering, [index[row] for row in keep], prepared.rows(keep) if keep.size else None)

    @functools.cached_property
    def model_flux(self) -> np.ndarray:
        return self.used.model_flux()

    @functools.cached_property
    def model_ivar(self) -> np.ndarray:
        return self.used.model_ivar()


class Analyzer:
    """Runs the requested models of a repository on raw spectra."""

    def __init__(self, models: Mapping[str, SessionModel]):
        self.models = models  # the store's own mapping: a model reloaded there is used here at once

    def resolve(self, names: Sequence[str] | None, variant: str = "") -> list[SessionModel]:
        """The models a request asks for (when empty: every ready full-precision model that
        analyses spectra, so not ``physformer-generate``, whose input is parameters); with a
        ``variant``, each one's ``<model>-<variant>`` (NOT_FOUND where there is none)."""
        if not names:
            names = [n for n, m in sorted(self.models.items())
                     if m.ready and _analyses_spectra(m) and not variant_of(n)]
            if not variant:
                return [self.models[n] for n in names]
        chosen = []
        for name in (with_variant(n, variant) for n in names):
            model = lookup(self.models, name)
            if not _analyses_spectra(model):
                raise InvalidInputError(
                    f"model {name!r} does not analyse spectra (its inputs: "
                    f"{', '.join(model.card.contract.input_names)}); call it with KServe ModelInfer")
            chosen.append(model)
        return chosen

    def analyze(self, spectra: Sequence[SpectrumInput], model_names: Sequence[str] | None = None,
                mc_samples: int = 0, deadline: float | None = None, variant: str = "") -> list[SpectrumOutcome]:
        """Run the models on the spectra. ``mc_samples``: Monte Carlo samples for the models that
        draw them (0: each model's default; beyond a model's maximum: InvalidInputError).
        ``deadline`` (time.monotonic()): a model run still queued then is not run
        (DeadlineExceededError). ``variant``: see :meth:`resolve`."""
        models = self.resolve(model_names, variant)
        outcomes = [SpectrumOutcome(s.id) for s in spectra]
        valid: list[SpectrumInput | None] = []
        for spectrum, outcome in zip(spectra, outcomes):
            try:
                valid.append(checked(spectrum))
            except InvalidSpectrumError as exc:
                outcome.error = exc
                valid.append(None)
        # one preprocessing per recipe (models on the same grid share it), then the models run
        # side by side (numpy and ONNX Runtime release the GIL); results are merged in model
        # order, so every spectrum lists its models in the same order whatever finished first
        recipes: dict[Preprocessing, list[SessionModel]] = {}
        for model in models:
            recipes.setdefault(model.card.preprocessing, []).append(model)
        staged = dict(zip(recipes, _side_by_side(lambda r: Staged.of(r, valid), list(recipes))))
        per_model = _side_by_side(
            lambda m: self._run_model(m, valid, staged[m.card.preprocessing], mc_samples, deadline), models)
        for results in per_model:
            for i, result in results:
                outcomes[i].results.append(result)
        return outcomes

    def _run_model(self, model: SessionModel, valid: Sequence[SpectrumInput | None], staged: "Staged",
                   mc_samples: int = 0, deadline: float | None = None) -> list[tuple[int, ModelResult]]:
        """One model on the valid spectra (None: rejected before), prepared by its card's recipe
        (``staged``): (spectrum index, result) pairs."""
        card = model.card
        recipe = card.preprocessing
        wants_ivar = "ivar" in card.contract.input_names

        def not_covering(i: int, coverage: float) -> tuple[int, ModelResult]:
            lo, hi = float(valid[i].wavelength[0]), float(valid[i].wavelength[-1])
            return i, ModelResult(
                model.name, model.version, False,
                reason=(f"spectrum covers {coverage:.0%} of the model grid "
                        f"({recipe.grid.wavelength[0]:.0f}-{recipe.grid.wavelength[-1]:.0f} A; "
                        f"spectrum {lo:.0f}-{hi:.0f} A); needs {MIN_COVERAGE:.0%}"))

        found = [not_covering(i, coverage) for i, coverage in staged.not_covering]
        if not staged.owners:
            return found
        used = staged.used
        inputs = {"flux": staged.model_flux}
        if wants_ivar:
            inputs["ivar"] = staged.model_ivar
        if mc_samples and N_SAMPLES in card.contract.input_names:
            inputs[N_SAMPLES] = np.array([mc_samples], dtype=np.int64)
        outputs = model.run(inputs, deadline)
        if wants_ivar:
            outputs["_has_ivar"] = used.has_ivar & inputs["ivar"].any(axis=1)  # sent with its own noise
        owners = staged.owners
        interpret = kind_of(card).interpret
        for row, i in enumerate(owners):
            result = ModelResult(model.name, model.version, True, values=interpret(card, outputs, row),
                                 class_names=card.class_names)
            if "probabilities" in outputs:
                result.probabilities = outputs["probabilities"][row]
            if "model_spectrum" in outputs:
                result.model_spectrum = outputs["model_spectrum"][row]
            found.append((i, result))
        return found
