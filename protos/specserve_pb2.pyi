from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DoubleArray(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class LogLinearGrid(_message.Message):
    __slots__ = ("start", "step", "length")
    START_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    start: float
    step: float
    length: int
    def __init__(self, start: _Optional[float] = ..., step: _Optional[float] = ..., length: _Optional[int] = ...) -> None: ...

class Spectrum(_message.Message):
    __slots__ = ("id", "wavelength", "grid", "flux", "ivar", "mask", "metadata", "redshift", "source_fwhm", "source_resolution")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    WAVELENGTH_FIELD_NUMBER: _ClassVar[int]
    GRID_FIELD_NUMBER: _ClassVar[int]
    FLUX_FIELD_NUMBER: _ClassVar[int]
    IVAR_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    REDSHIFT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FWHM_FIELD_NUMBER: _ClassVar[int]
    SOURCE_RESOLUTION_FIELD_NUMBER: _ClassVar[int]
    id: str
    wavelength: DoubleArray
    grid: LogLinearGrid
    flux: _containers.RepeatedScalarFieldContainer[float]
    ivar: _containers.RepeatedScalarFieldContainer[float]
    mask: _containers.RepeatedScalarFieldContainer[bool]
    metadata: _containers.ScalarMap[str, str]
    redshift: float
    source_fwhm: float
    source_resolution: float
    def __init__(self, id: _Optional[str] = ..., wavelength: _Optional[_Union[DoubleArray, _Mapping]] = ..., grid: _Optional[_Union[LogLinearGrid, _Mapping]] = ..., flux: _Optional[_Iterable[float]] = ..., ivar: _Optional[_Iterable[float]] = ..., mask: _Optional[_Iterable[bool]] = ..., metadata: _Optional[_Mapping[str, str]] = ..., redshift: _Optional[float] = ..., source_fwhm: _Optional[float] = ..., source_resolution: _Optional[float] = ...) -> None: ...

class AnalyzeRequest(_message.Message):
    __slots__ = ("request_id", "spectra", "models", "mc_samples", "return_model_spectrum", "variant")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SPECTRA_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    MC_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    RETURN_MODEL_SPECTRUM_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    spectra: _containers.RepeatedCompositeFieldContainer[Spectrum]
    models: _containers.RepeatedScalarFieldContainer[str]
    mc_samples: int
    return_model_spectrum: bool
    variant: str
    def __init__(self, request_id: _Optional[str] = ..., spectra: _Optional[_Iterable[_Union[Spectrum, _Mapping]]] = ..., models: _Optional[_Iterable[str]] = ..., mc_samples: _Optional[int] = ..., return_model_spectrum: _Optional[bool] = ..., variant: _Optional[str] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    class Code(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        UNSPECIFIED: _ClassVar[Error.Code]
        CANCELLED: _ClassVar[Error.Code]
        UNKNOWN: _ClassVar[Error.Code]
        INVALID_ARGUMENT: _ClassVar[Error.Code]
        DEADLINE_EXCEEDED: _ClassVar[Error.Code]
        NOT_FOUND: _ClassVar[Error.Code]
        RESOURCE_EXHAUSTED: _ClassVar[Error.Code]
        FAILED_PRECONDITION: _ClassVar[Error.Code]
        UNIMPLEMENTED: _ClassVar[Error.Code]
        INTERNAL: _ClassVar[Error.Code]
        UNAVAILABLE: _ClassVar[Error.Code]
    UNSPECIFIED: Error.Code
    CANCELLED: Error.Code
    UNKNOWN: Error.Code
    INVALID_ARGUMENT: Error.Code
    DEADLINE_EXCEEDED: Error.Code
    NOT_FOUND: Error.Code
    RESOURCE_EXHAUSTED: Error.Code
    FAILED_PRECONDITION: Error.Code
    UNIMPLEMENTED: Error.Code
    INTERNAL: Error.Code
    UNAVAILABLE: Error.Code
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: Error.Code
    message: str
    def __init__(self, code: _Optional[_Union[Error.Code, str]] = ..., message: _Optional[str] = ...) -> None: ...

class ModelResult(_message.Message):
    __slots__ = ("model", "version", "applicable", "not_applicable_reason", "values", "class_names", "probabilities", "model_spectrum")
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    APPLICABLE_FIELD_NUMBER: _ClassVar[int]
    NOT_APPLICABLE_REASON_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    MODEL_SPECTRUM_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    applicable: bool
    not_applicable_reason: str
    values: _containers.ScalarMap[str, float]
    class_names: _containers.RepeatedScalarFieldContainer[str]
    probabilities: _containers.RepeatedScalarFieldContainer[float]
    model_spectrum: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., applicable: _Optional[bool] = ..., not_applicable_reason: _Optional[str] = ..., values: _Optional[_Mapping[str, float]] = ..., class_names: _Optional[_Iterable[str]] = ..., probabilities: _Optional[_Iterable[float]] = ..., model_spectrum: _Optional[_Iterable[float]] = ...) -> None: ...

class SpectrumResult(_message.Message):
    __slots__ = ("id", "results", "error")
    ID_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    id: str
    results: _containers.RepeatedCompositeFieldContainer[ModelResult]
    error: Error
    def __init__(self, id: _Optional[str] = ..., results: _Optional[_Iterable[_Union[ModelResult, _Mapping]]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class AnalyzeResponse(_message.Message):
    __slots__ = ("request_id", "results")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    results: _containers.RepeatedCompositeFieldContainer[SpectrumResult]
    def __init__(self, request_id: _Optional[str] = ..., results: _Optional[_Iterable[_Union[SpectrumResult, _Mapping]]] = ...) -> None: ...

class AnalyzeStreamResponse(_message.Message):
    __slots__ = ("request_id", "results", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    results: _containers.RepeatedCompositeFieldContainer[SpectrumResult]
    error: Error
    def __init__(self, request_id: _Optional[str] = ..., results: _Optional[_Iterable[_Union[SpectrumResult, _Mapping]]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "ready", "reason", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    ready: bool
    reason: str
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., ready: _Optional[bool] = ..., reason: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...
