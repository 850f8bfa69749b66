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
from specserve.runtime.pipeline import MIN_COVERAGE, checked, prepare, span_coverage
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
        # the models run side by side (ONNX Runtime releases the GIL); results are merged in model
        # order, so every spectrum lists its models in the same order whatever finished first
        if len(models) > 1:
            futures = [_POOL.submit(self._run_model, m, valid, mc_samples, deadline) for m in models]
            per_model = [f.result() for f in futures]
        else:
            per_model = [self._run_model(m, valid, mc_samples, deadline) for m in models]
        for results in per_model:
            for i, result in results:
                outcomes[i].results.append(result)
        return outcomes

    def _run_model(self, model: SessionModel, valid: Sequence[SpectrumInput | None],
                   mc_samples: int = 0, deadline: float | None = None) -> list[tuple[int, ModelResult]]:
        """One model on the valid spectra (None: rejected before): (spectrum index, result) pairs.
        The spectra go through :func:`specserve.runtime.pipeline.prepare` with the model card's
        recipe, exactly as the model's training and test spectra did."""
        found: list[tuple[int, ModelResult]] = []
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

        # a spectrum whose wavelength span cannot cover enough of the grid is turned away before
        # its preprocessing (the span bounds the coverage from above); the rest are checked exactly
        index = []
        for i, s in enumerate(valid):
            if s is None:
                continue
            span = span_coverage(recipe, s)
            if span < MIN_COVERAGE:
                found.append(not_covering(i, span))
            else:
                index.append(i)
        prepared = prepare(recipe, [valid[i] for i in index])
        coverage = prepared.coverage
        keep = np.flatnonzero(coverage >= MIN_COVERAGE)
        found += [not_covering(index[row], float(coverage[row])) for row in np.flatnonzero(coverage < MIN_COVERAGE)]
        owners = [index[row] for row in keep]
        if not owners:
            return found
        used = prepared.rows(keep)
        inputs = {"flux": used.model_flux()}
        if wants_ivar:
            inputs["ivar"] = used.model_ivar()
        if mc_samples and N_SAMPLES in card.contract.input_names:
            inputs[N_SAMPLES] = np.array([mc_samples], dtype=np.int64)
        outputs = model.run(inputs, deadline)
        if wants_ivar:
            outputs["_has_ivar"] = used.has_ivar & inputs["ivar"].any(axis=1)  # sent with its own noise
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
