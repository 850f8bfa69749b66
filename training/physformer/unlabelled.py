"""Unlabelled real stellar spectra of the data kit for PhysFormer's semi-supervised training.

These spectra carry no catalogue parameters: they enter training through the reconstruction
chi-square only. Each is read by the project's readers (:func:`specserve.runtime.io.read_spectra`),
turned into a request (:meth:`SpectrumInput.from_spectrum`) and run through the serving pipeline
(:func:`specserve.runtime.pipeline.prepare_raw`) with the ``stars`` set's own recipe, so they lie
on its grid exactly as its labelled spectra do: ``prepared.flux`` etc. are (n, P), P the ``stars``
grid's length.

Sources (``source``):

``lamost_unlabelled``   LAMOST DR1 files that are not in the ``stars`` set (by file), whose class in
                        ``lamost_dr1/labels.csv`` (``cls``, else the header's ``CLASS``) is not
                        GALAXY or QSO.
``stelib``              STELIB (``stelib/*.fits``).
``sdss_dr12``           SDSS DR12 ``spec-*.fits`` files whose pipeline ``CLASS`` is STAR.
``boss_template``       the co-added BOSS stellar spectra by spectral type.
``sdss_star_template``  the 123 stellar spectra of ``spEigenStar``.

Left out and counted in :attr:`UnlabelledSet.excluded` by reason:

- objects that are not normal stars by their class, spectral type or name: galaxies and QSOs,
  white dwarfs (``DA``, ``DC``, ``WD``...), carbon stars, L/T dwarfs, Wolf-Rayet stars (``WN``,
  ``WC``), cataclysmic variables;
- the leakage rule: any spectrum of the same star as a ``stars`` spectrum of the validation or
  test split (train-split stars are kept: they are labelled already and are not evaluation data).
  Stars are matched by name where both sides have one: MILES names come from
  ``miles/paramsMILES_v9.1.txt`` (MILES number -> name; the MILES FITS headers hold no name or
  position), STELIB names from the file name and the ``OBJECT``/``STARIDEN`` cards, the
  ``spEigenStar`` names from the HD or Giclas number in brackets (``"G8V (101501)"``), LAMOST from
  ``DESIG``; HD/HR/HIP, BD/CD/CPD and Giclas names are normalised (case, spaces, leading zeros).
  They are matched by position where both sides have one, within :data:`MATCH_RADIUS_ARCSEC`:
  LAMOST ``RA``/``DEC`` (FK5 J2000), SDSS ``PLUG_RA``/``PLUG_DEC``, STELIB's ``RA``/``DEC``
  (sexagesimal strings, or radians whose comments are read instead since their negative
  declinations are wrong; B1950 moved to J2000). So STELIB and the templates meet the held-out
  MILES stars by name, and LAMOST, SDSS and STELIB meet the held-out LAMOST stars by position.
  Ambiguous matches are left out too: the same catalogue number with another component or suffix
  (``HD048682A`` and ``HD048682``), or a position within :data:`AMBIGUOUS_RADIUS_ARCSEC` (STELIB's
  positions are good to about 30 arcsec: HD 2857 and HD 101501 come out 13 and 25 arcsec from
  their catalogue places). The SDSS subclass names a template (``"G8V (101501)"``), not the
  object, and is not a name; the BOSS templates are co-adds of many stars and have none. A
  held-out MILES spectrum without a name, or a STELIB position that cannot be read, raises: the
  rule could not be checked;
- spectra covering less than :data:`~specserve.training.benchsets.MIN_GRID_COVERAGE` of the grid.

The order is deterministic: by source, then file, then the spectrum's place in its file.
"""

from __future__ import annotations

import csv
import logging
import re
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy import units as u
from astropy.coordinates import FK4, SkyCoord
from astropy.io import fits

from specserve.runtime.datakit import data_dir
from specserve.runtime.errors import DatasetError, SpectrumReadError
from specserve.runtime.io import read_spectra
from specserve.runtime.pipeline import Prepared, prepare_raw
from specserve.runtime.spectrum import Spectrum, SpectrumInput
from specserve.training.benchsets import MIN_GRID_COVERAGE, SPLIT_NAMES, BenchmarkSet

log = logging.getLogger(__name__)

SOURCES: dict[str, str] = {
    "boss_template": "sdss_boss_templates/*.fits",
    "lamost_unlabelled": "lamost_dr1/fits/*.fits",
    "sdss_dr12": "sdss_dr12/spec-*.fits",
    "sdss_star_template": "sdss_templates/spEigenStar-*.fits",
    "stelib": "stelib/*.fits",
}
"""Source name -> glob under the kit root."""

MATCH_RADIUS_ARCSEC = 20.0
AMBIGUOUS_RADIUS_ARCSEC = 60.0
HELDOUT_SPLITS = ("validation", "test")

SAME_STAR = "same star as a stars validation/test spectrum"
MAYBE_SAME_STAR = "possibly the same star as a stars validation/test spectrum"
COVERAGE = "coverage"
IN_STARS = "labelled: in the stars set"
NOT_A_STAR = "not a star"
WHITE_DWARF = "white dwarf"
CARBON = "carbon star"
LT_DWARF = "L/T dwarf"
WOLF_RAYET = "Wolf-Rayet star"
CV = "cataclysmic variable"

MILES_PARAMS = "miles/paramsMILES_v9.1.txt"


@dataclass(frozen=True)
class UnlabelledSet:
    """Unlabelled spectra on the ``stars`` grid, n rows in the order of the module docstring.

    ``prepared`` is the pipeline's output, (n, P) arrays; ``raw`` the spectra as read (requests
    before the pipeline, for raw-level augmentation); ``excluded`` counts what was left out, by
    reason."""

    source: np.ndarray
    file: np.ndarray
    object_id: np.ndarray
    prepared: Prepared
    excluded: dict[str, int]
    raw: tuple[SpectrumInput, ...] = ()

    def __len__(self) -> int:
        return int(self.source.size)


# ---------------------------------------------------------------- star names

_SPACES = re.compile(r"[\s_]+")
_NUMBERED = re.compile(r"^(HD|HR|HIP|SAO|GJ|GL|LHS|LTT|FEIGE)\s*0*(\d+)\s*([A-Z]*)$")
_DURCHMUSTERUNG = re.compile(r"^(BD|CD|CPD)\s*([+-])\s*(\d{1,2})\s*[ -]?\s*0*(\d+)\s*([A-Z]*)$")
_GICLAS = re.compile(r"^G\s*0*(\d+)\s*-\s*0*(\d+)\s*([A-Z]*)$")


def star_key(name: str | None) -> tuple[str, str] | None:
    """(star, component) of a star name, normalised so that spellings of one catalogue entry agree:
    ``"HD002857"``, ``"hd 2857"`` -> ``("HD2857", "")``; ``"BD+002058A"`` -> ``("BD+0 2058", "A")``;
    ``"G004-036"``, ``"G_4-36"`` -> ``("G4-36", "")``. Other names: upper case without spaces and no
    component. None for an empty name."""
    if name is None:
        return None
    text = _SPACES.sub(" ", str(name).upper()).strip()
    if not text:
        return None
    if m := _NUMBERED.match(text):
        return f"{m[1]}{int(m[2])}", m[3]
    if m := _DURCHMUSTERUNG.match(text):
        return f"{m[1]}{m[2]}{int(m[3])} {int(m[4])}", m[5]
    if m := _GICLAS.match(text):
        return f"G{int(m[1])}-{int(m[2])}", m[3]
    return text.replace(" ", ""), ""


def miles_names(root: Path) -> dict[int, str]:
    """MILES number -> star name, from the MILES parameter table (fixed columns: name 0-22, number
    22-27; rows without a four-digit number are skipped)."""
    names = {}
    for line in (root / MILES_PARAMS).read_text().splitlines()[3:]:
        number = line[22:27].strip()
        if re.fullmatch(r"\d{4}", number):
            names[int(number)] = line[:22].strip()
    return names


def _miles_number(file: str) -> int:
    m = re.search(r"_m(\d{4})V\.fits$", file)
    if m is None:
        raise DatasetError(f"unlabelled: cannot tell the MILES number of {file}")
    return int(m[1])


def _eigen_star_name(object_id: str) -> str | None:
    """The catalogue name in a spEigenStar template's name: ``"A1V (95418)"`` -> ``"HD95418"``,
    ``"A4 (G_165-39)"`` -> ``"G_165-39"``; None for names without one (``"Carbon"``)."""
    m = re.search(r"\(([^)]*)\)\s*$", object_id)
    if m is None:
        return None
    inner = m[1].strip()
    return f"HD{inner}" if inner.isdigit() else inner


# ---------------------------------------------------------------- positions

def _sexagesimal(text: str) -> float:
    """``" 5:06:40.39"``, ``"-0 32 40.3"`` -> signed value in the first field's unit."""
    fields = re.split(r"[:\s]+", text.strip())
    if len(fields) != 3:
        raise ValueError(f"not sexagesimal: {text!r}")
    sign = -1.0 if fields[0].startswith("-") else 1.0
    head, minutes, seconds = abs(float(fields[0])), float(fields[1]), float(fields[2])
    return sign * (head + minutes / 60.0 + seconds / 3600.0)


def stelib_position(header: fits.Header) -> tuple[float, float]:
    """ICRS (RA, Dec) in degrees of a STELIB spectrum. The cards hold either sexagesimal strings
    (``RA = ' 5:06:40.39'``, hours) or radians with the sexagesimal value in their comment
    (``Mean RA  00 29 20.4``); the radians' negative declinations are wrong (degrees and minutes
    added with opposite signs), so the comments are read. ``EQUINOX`` B1950.0 is moved to J2000."""
    ra_card, dec_card = header["RA"], header["DEC"]
    if isinstance(ra_card, str):
        ra_hours, dec_deg = _sexagesimal(ra_card), _sexagesimal(str(dec_card))
    else:
        ra_hours = _sexagesimal(header.comments["RA"].replace("Mean RA", ""))
        dec_deg = _sexagesimal(header.comments["DEC"].replace("Mean Dec", ""))
        if abs(np.deg2rad(ra_hours * 15.0) - float(ra_card)) > 1e-4:
            raise ValueError(f"RA card {ra_card} disagrees with its comment {header.comments['RA']!r}")
    equinox = str(header.get("EQUINOX", "")).strip().upper()
    if equinox.startswith("B1950"):
        coord = SkyCoord(ra_hours * 15.0 * u.deg, dec_deg * u.deg, frame=FK4(equinox="B1950"))
    elif equinox.startswith("J2000"):
        coord = SkyCoord(ra_hours * 15.0 * u.deg, dec_deg * u.deg, frame="fk5")
    else:
        raise ValueError(f"unknown EQUINOX {equinox!r}")
    icrs = coord.icrs
    return float(icrs.ra.deg), float(icrs.dec.deg)


def _header(path: Path) -> fits.Header:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fits.verify.VerifyWarning)
        return fits.getheader(path)


# ---------------------------------------------------------------- what is not a normal star

_WHITE_DWARF = re.compile(r"^D[ABCOQZX]+(?![a-z])|WD|[Ww]hite ?[Dd]warf|WHITE ?DWARF")
_LT_DWARF = re.compile(r"^[LT]\d|^[LT]DWARF", re.IGNORECASE)
_WOLF_RAYET = re.compile(r"^W[NCO]")
_CV = re.compile(r"^CV\b|CATACLYSMIC", re.IGNORECASE)


def abnormal_type(kind: str | None) -> str | None:
    """The exclusion reason for a spectral type or class name that is not a normal star, else None:
    ``"DA:"`` -> white dwarf, ``"Ldwarf"``/``"L2"`` -> L/T dwarf, ``"WN"`` -> Wolf-Rayet..."""
    if not kind:
        return None
    text = str(kind).strip()
    if text.upper() in ("GALAXY", "QSO"):
        return NOT_A_STAR
    if _WHITE_DWARF.search(text):
        return WHITE_DWARF
    if "CARBON" in text.upper():
        return CARBON
    if _LT_DWARF.search(text):
        return LT_DWARF
    if _WOLF_RAYET.search(text):
        return WOLF_RAYET
    if _CV.search(text):
        return CV
    return None


# ---------------------------------------------------------------- held-out stars

@dataclass(frozen=True)
class _Identity:
    """What identifies the star of one spectrum: normalised names and an ICRS position (deg)."""

    names: tuple[tuple[str, str], ...] = ()
    position: tuple[float, float] | None = None


def _identity(names: Sequence[str | None], position: tuple[float, float] | None) -> _Identity:
    keys = tuple(sorted({k for k in (star_key(n) for n in names) if k is not None}))
    return _Identity(keys, position)


def _heldout(bench: BenchmarkSet, root: Path) -> list[_Identity]:
    """The identity of every ``stars`` spectrum of the validation and test splits."""
    split = bench.arrays["split"]
    held = np.isin(split, [SPLIT_NAMES.index(s) for s in HELDOUT_SPLITS])
    miles = None
    out = []
    for i in np.flatnonzero(held):
        file, source = str(bench.arrays["file"][i]), str(bench.arrays["source"][i])
        if source == "miles":
            miles = miles_names(root) if miles is None else miles
            number = _miles_number(file)
            if number not in miles:
                raise DatasetError(f"unlabelled: {file} has no name in {MILES_PARAMS}; the leakage "
                                   "rule cannot be checked")
            out.append(_identity([miles[number]], None))
        elif source == "lamost":
            header = _header(root / file)
            out.append(_identity([header.get("DESIG")], (float(header["RA"]), float(header["DEC"]))))
        else:
            raise DatasetError(f"unlabelled: no identity rule for stars source {source!r}")
    return out


def _leak(candidate: _Identity, heldout: list[_Identity], positions: SkyCoord | None) -> str | None:
    """SAME_STAR, MAYBE_SAME_STAR or None for a candidate against the held-out stars."""
    verdict = None
    names = dict(candidate.names)
    for held in heldout:
        for star, component in held.names:
            if star in names:
                if names[star] == component:
                    return SAME_STAR
                verdict = MAYBE_SAME_STAR
    if candidate.position is not None and positions is not None:
        here = SkyCoord(candidate.position[0] * u.deg, candidate.position[1] * u.deg)
        nearest = here.separation(positions).arcsec.min()
        if nearest <= MATCH_RADIUS_ARCSEC:
            return SAME_STAR
        if nearest <= AMBIGUOUS_RADIUS_ARCSEC:
            verdict = MAYBE_SAME_STAR
    return verdict


# ---------------------------------------------------------------- candidates

@dataclass(frozen=True)
class _Candidate:
    source: str
    file: str
    index: int
    spectrum: Spectrum
    identity: _Identity
    reason: str | None


def _lamost_classes(root: Path) -> dict[str, str]:
    with open(root / "lamost_dr1" / "labels.csv", newline="") as fh:
        return {row["file"]: (row.get("cls") or "").strip() for row in csv.DictReader(fh)}


def _candidates(root: Path, source: str, stars_files: set[str]) -> list[_Candidate]:
    out = []
    classes = _lamost_classes(root) if source == "lamost_unlabelled" else {}
    for path in sorted(root.glob(SOURCES[source])):
        rel = str(path.relative_to(root))
        try:
            spectra = read_spectra(path)
        except SpectrumReadError as exc:
            raise DatasetError(f"unlabelled: cannot read kit file {rel}: {exc.reason}") from exc
        header = _header(path) if source in ("lamost_unlabelled", "stelib") else None
        for k, spectrum in enumerate(spectra):
            meta = spectrum.meta
            reason, identity = None, _Identity()
            if source == "lamost_unlabelled":
                cls = classes.get(path.name) or meta.survey_class
                reason = (IN_STARS if rel in stars_files
                          else NOT_A_STAR if str(cls).upper() in ("GALAXY", "QSO")
                          else abnormal_type(meta.survey_subclass))
                identity = _identity([header.get("DESIG")], (float(header["RA"]), float(header["DEC"])))
            elif source == "stelib":
                reason = abnormal_type(header.get("SPECTYPE"))
                try:
                    position = stelib_position(header)
                except (KeyError, ValueError) as exc:
                    raise DatasetError(f"unlabelled: no position for {rel} ({exc}); the leakage rule "
                                       "cannot be checked") from exc
                stem = path.stem.split("_")[-1]
                identity = _identity([stem, header.get("OBJECT"), header.get("STARIDEN")], position)
            elif source == "sdss_dr12":
                reason = (NOT_A_STAR if str(meta.survey_class).upper() != "STAR"
                          else abnormal_type(meta.survey_subclass))
                position = (meta.ra, meta.dec) if meta.ra is not None and meta.dec is not None else None
                identity = _Identity((), position)
            elif source == "sdss_star_template":
                reason = abnormal_type(meta.survey_subclass)
                identity = _identity([_eigen_star_name(meta.object_id)], None)
            elif source == "boss_template":
                reason = abnormal_type(meta.survey_subclass)
            out.append(_Candidate(source, rel, k, spectrum, identity, reason))
    return out


def unlabelled_spectra(bench: BenchmarkSet, sources: Sequence[str] | None = None,
                       data: Path | None = None) -> UnlabelledSet:
    """The kit's unlabelled real stellar spectra of ``sources`` (default: all of :data:`SOURCES`) on
    ``bench``'s grid (``bench`` is the ``stars`` set), with the leakage rule and exclusions of the
    module docstring. Raises ValueError for an unknown source name."""
    chosen = sorted(SOURCES) if sources is None else sorted(set(sources))
    unknown = [s for s in chosen if s not in SOURCES]
    if unknown:
        raise ValueError(f"unknown unlabelled source(s) {', '.join(map(repr, unknown))}; "
                         f"known: {', '.join(SOURCES)}")
    root = data_dir(data)
    heldout = _heldout(bench, root)
    held_positions = [h.position for h in heldout if h.position is not None]
    positions = (SkyCoord([p[0] for p in held_positions] * u.deg, [p[1] for p in held_positions] * u.deg)
                 if held_positions else None)
    stars_files = {str(f) for f in bench.arrays["file"]}

    excluded: Counter[str] = Counter()
    kept: list[_Candidate] = []
    for source in chosen:
        for cand in _candidates(root, source, stars_files):
            reason = cand.reason or _leak(cand.identity, heldout, positions)
            if reason is None:
                kept.append(cand)
            else:
                excluded[reason] += 1
                log.debug("unlabelled: %s[%d] (%s) left out: %s", cand.file, cand.index,
                          cand.spectrum.meta.object_id, reason)

    raws = [SpectrumInput.from_spectrum(c.spectrum) for c in kept]
    prepared = prepare_raw(bench.preprocessing, raws) if raws else None
    if prepared is not None:
        covered = np.flatnonzero(prepared.coverage >= MIN_GRID_COVERAGE)
        excluded[COVERAGE] += len(kept) - covered.size
        prepared = prepared.rows(covered)
        kept = [kept[i] for i in covered]
        raws = [raws[i] for i in covered]
    else:
        n_pix = bench.preprocessing.grid.length
        prepared = Prepared(np.zeros((0, n_pix), np.float32), np.zeros((0, n_pix), np.float32),
                            np.zeros((0, n_pix), bool), np.zeros(0, bool))

    result = UnlabelledSet(
        source=np.asarray([c.source for c in kept], dtype=str),
        file=np.asarray([c.file for c in kept], dtype=str),
        object_id=np.asarray([c.spectrum.meta.object_id for c in kept], dtype=str),
        prepared=prepared,
        excluded={k: int(v) for k, v in sorted(excluded.items()) if v},
        raw=tuple(raws),
    )
    log.info("unlabelled: %d spectra (%s); left out: %s", len(result),
             ", ".join(f"{s} {int((result.source == s).sum())}" for s in chosen), result.excluded or "none")
    return result
