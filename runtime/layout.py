"""The model repository on disk, in Triton's layout: the one home of its format.

``<repo>/<model>/config.pbtxt`` and ``<repo>/<model>/<version>/model.onnx``. The config is a
``inference.ModelConfig`` in protobuf text format, written and read with Triton's own schema
(``model_config_pb2`` via :mod:`specserve.protos.kserve`) and ``google.protobuf.text_format``,
so ``specserve serve`` reads exactly what Triton reads: comments are comments, and a field
Triton does not know (``max_batch_sise``) is a parse error that leaves the model not ready, with
the error as the reason (an older version already serving keeps serving).

What specserve takes from a config:

- ``max_batch_size``: rows per session run. A model whose tensors do not all lead with the
  batch axis (the MC models, whose ``samples`` output has it second) has ``max_batch_size: 0``
  in Triton's sense; its row limit is the ``specserve_max_batch_rows`` parameter.
- ``dynamic_batching``: requests from different callers share a run only when it is present
  (Triton's default scheduler runs each request alone). ``max_queue_delay_microseconds`` is the
  longest the oldest request waits for a fuller batch; ``default_queue_policy.max_queue_size``
  the requests that may wait (0, Triton's "unbounded", keeps specserve's default bound).
- ``instance_group``: the sum of the groups' counts (Triton's default count is 1) is the number of
  session runs at once; no group: decided by the device.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from specserve.runtime import dtypes
from specserve.runtime.contract import BATCH, DYNAMIC_DIMS, ModelCard, TensorSpec
from specserve.runtime.errors import ContractError, InvalidInputError
from specserve.runtime.kinds import kind_of

if TYPE_CHECKING:
    from tritonclient.grpc.model_config_pb2 import ModelConfig

CONFIG_FILE = "config.pbtxt"
MODEL_FILE = "model.onnx"
PLATFORM = "onnxruntime_onnx"
BACKEND = "onnxruntime"
ROWS_PARAMETER = "specserve_max_batch_rows"
"""Row limit of a model with ``max_batch_size: 0`` (its batch axis is not every tensor's first)."""
DEFAULT_MAX_BATCH_SIZE = 256
"""Rows per session run of a model whose config does not say (and the default written)."""
DEFAULT_MAX_QUEUE_SIZE = 1024
"""Requests that may wait for a model; one more is refused with RESOURCE_EXHAUSTED."""



def _schema():
    """Triton's ModelConfig module and protobuf's text_format, imported when a config is written
    or read (the folder helpers need neither, so the embedded runtime runs without protobuf)."""
    from google.protobuf import text_format

    from specserve.protos.kserve import model_config_pb2

    return model_config_pb2, text_format


# ---------------------------------------------------------------- folders


def check_model_name(name: str) -> str:
    """``name`` if it can name a model folder: not empty, one path segment, not hidden;
    :class:`InvalidInputError` otherwise."""
    if not name:
        raise InvalidInputError("a model name is required")
    if len(name) > 255 or any(c in name for c in "/\\\0") or name.startswith(".") or not name.isprintable():
        raise InvalidInputError(f"invalid model name {name[:64]!r}: one folder name, not hidden, no path separators")
    return name


def model_folders(repo: Path) -> list[Path]:
    """The model folders of a repository (hidden ones skipped), by name."""
    return sorted(p for p in Path(repo).iterdir() if p.is_dir() and not p.name.startswith("."))


def model_versions(model_dir: Path) -> list[int]:
    """The numbered version folders of a model, newest first."""
    return sorted((int(v.name) for v in model_dir.iterdir() if v.is_dir() and v.name.isdigit()), reverse=True)


def version_file(model_dir: Path, version: int | str) -> Path:
    return model_dir / str(version) / MODEL_FILE


def folder_signature(model_dir: Path) -> tuple:
    """What a change of a model folder changes: its versions' model files (sizes and mtimes) and
    its config.pbtxt."""
    entries: list[tuple] = []
    for version in model_versions(model_dir):
        try:
            st = version_file(model_dir, version).stat()
        except OSError:
            entries.append((version, None))
            continue
        entries.append((version, st.st_size, st.st_mtime_ns))
    try:
        entries.append((CONFIG_FILE, (model_dir / CONFIG_FILE).stat().st_mtime_ns))
    except OSError:
        pass
    return tuple(entries)


# ---------------------------------------------------------------- config.pbtxt: write


def _batched(tensors: tuple[TensorSpec, ...]) -> bool:
    """True when every tensor's first axis is the batch (Triton's max_batch_size > 0 convention)."""
    return all(t.shape[:1] == (BATCH,) for t in tensors)


def _dims(spec: TensorSpec, dims: dict[str, int], batched: bool) -> list[int]:
    resolved = spec.resolve(dims)[1:] if batched else spec.resolve(dims)
    return [-1 if d in DYNAMIC_DIMS else int(d) for d in resolved]


def _data_type(spec: TensorSpec) -> int:
    mc, _ = _schema()
    return mc.DataType.Value(f"TYPE_{dtypes.from_name(spec.dtype).kserve}")


def model_config(name: str, card: ModelCard, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                 max_queue_delay_us: int = 0, max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE) -> ModelConfig:
    """Triton's config of a model from its card: onnxruntime platform, tensors from the contract
    (optional inputs marked ``optional``), dynamic batching with these knobs."""
    mc, _ = _schema()
    contract, dims = card.contract, card.dims
    batched = _batched(contract.inputs + contract.outputs)
    config = mc.ModelConfig(name=name, platform=PLATFORM, max_batch_size=max_batch_size if batched else 0)
    for spec in contract.inputs:
        config.input.add(name=spec.name, data_type=_data_type(spec), dims=_dims(spec, dims, batched),
                         optional=spec.optional)
    for spec in contract.outputs:
        config.output.add(name=spec.name, data_type=_data_type(spec), dims=_dims(spec, dims, batched))
    config.dynamic_batching.max_queue_delay_microseconds = max_queue_delay_us
    config.dynamic_batching.default_queue_policy.max_queue_size = max_queue_size
    if not batched:
        # MC models tile every row n_samples times inside the graph: fewer rows per run
        rows = min(max_batch_size, kind_of(card).mc_rows_per_run)
        config.parameters[ROWS_PARAMETER].string_value = str(rows)
    return config


def config_text(config: ModelConfig) -> str:
    return _schema()[1].MessageToString(config)


def write_config(model_dir: Path, config: ModelConfig) -> Path:
    path = model_dir / CONFIG_FILE
    tmp = model_dir / f".{CONFIG_FILE}.tmp"
    tmp.write_text(config_text(config))
    os.replace(tmp, path)  # a watcher never reads half a config
    return path


def write_version(repo: str | Path, name: str, version: int, onnx_file: str | Path,
                  config: ModelConfig) -> Path:
    """Copy a validated model file in as ``<repo>/<name>/<version>/model.onnx`` and write the
    model's config; returns the version folder."""
    if version < 1:
        raise ValueError(f"model versions start at 1, got {version}")
    model_dir = Path(repo) / name
    version_dir = model_dir / str(version)
    version_dir.mkdir(parents=True, exist_ok=True)
    tmp = version_dir / f".{MODEL_FILE}.tmp"
    shutil.copyfile(onnx_file, tmp)
    os.replace(tmp, version_dir / MODEL_FILE)  # a watcher never sees a half-written model
    write_config(model_dir, config)
    return version_dir


# ---------------------------------------------------------------- config.pbtxt: read


def parse_config(text: str, source: str = CONFIG_FILE) -> ModelConfig:
    """A config's text as Triton parses it (ContractError naming line and column otherwise)."""
    mc, text_format = _schema()
    try:
        return text_format.Parse(text, mc.ModelConfig())
    except text_format.ParseError as exc:
        raise ContractError(f"{source}: {exc}") from None


def read_config(model_dir: Path) -> ModelConfig | None:
    """The model folder's config, or None when it has none."""
    path = model_dir / CONFIG_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ContractError(f"cannot read {path}: {exc.strerror or exc}") from None
    return parse_config(text, str(path))


def check_config(config: ModelConfig, folder: str, card: ModelCard) -> None:
    """What Triton would refuse for this model: another name than the folder's, another platform
    or backend than ONNX Runtime's, tensors the model does not have, a required input left out."""
    if config.name and config.name != folder:
        raise ContractError(f"{CONFIG_FILE}: name {config.name!r} is not the folder's name {folder!r}")
    if config.platform and config.platform != PLATFORM:
        raise ContractError(f"{CONFIG_FILE}: platform {config.platform!r} is not {PLATFORM!r}")
    if config.backend and config.backend != BACKEND:
        raise ContractError(f"{CONFIG_FILE}: backend {config.backend!r} is not {BACKEND!r}")
    if config.max_batch_size < 0:
        raise ContractError(f"{CONFIG_FILE}: max_batch_size {config.max_batch_size} is negative")
    contract = card.contract
    inputs = {t.name: t for t in contract.inputs}
    outputs = {t.name for t in contract.outputs}
    unknown = [t.name for t in config.input if t.name not in inputs]
    unknown += [t.name for t in config.output if t.name not in outputs]
    if unknown:
        raise ContractError(f"{CONFIG_FILE}: the model has no tensors {unknown} "
                            f"(inputs {sorted(inputs)}, outputs {sorted(outputs)})")
    if config.input:
        listed = {t.name for t in config.input}
        missing = [n for n, t in inputs.items() if n not in listed and not t.optional]
        if missing:
            raise ContractError(f"{CONFIG_FILE}: required inputs {missing} are not listed")
    # the tensors the config declares must be the model's (a file of another kind, or for another
    # grid, dropped into this folder is refused, not served under the folder's name)
    expected = model_config(folder, card)
    by_name = {t.name: t for t in list(expected.input) + list(expected.output)}
    for tensor in list(config.input) + list(config.output):
        want = by_name[tensor.name]
        if tensor.data_type != want.data_type or (tensor.dims and list(tensor.dims) != list(want.dims)):
            mc, _ = _schema()
            raise ContractError(
                f"{CONFIG_FILE}: tensor {tensor.name!r} is declared {mc.DataType.Name(tensor.data_type)} "
                f"{list(tensor.dims)} but the model's is {mc.DataType.Name(want.data_type)} {list(want.dims)}")
