from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelRef(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class SentimentRequest(_message.Message):
    __slots__ = ("texts", "model", "version", "version_label", "whole_text", "explain")
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSION_LABEL_FIELD_NUMBER: _ClassVar[int]
    WHOLE_TEXT_FIELD_NUMBER: _ClassVar[int]
    EXPLAIN_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    model: str
    version: int
    version_label: str
    whole_text: bool
    explain: bool
    def __init__(self, texts: _Optional[_Iterable[str]] = ..., model: _Optional[str] = ..., version: _Optional[int] = ..., version_label: _Optional[str] = ..., whole_text: _Optional[bool] = ..., explain: _Optional[bool] = ...) -> None: ...

class Slot(_message.Message):
    __slots__ = ("id", "token", "kind")
    ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    id: int
    token: str
    kind: str
    def __init__(self, id: _Optional[int] = ..., token: _Optional[str] = ..., kind: _Optional[str] = ...) -> None: ...

class WindowScore(_message.Message):
    __slots__ = ("slots", "label", "probabilities")
    class ProbabilitiesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    slots: _containers.RepeatedCompositeFieldContainer[Slot]
    label: str
    probabilities: _containers.ScalarMap[str, float]
    def __init__(self, slots: _Optional[_Iterable[_Union[Slot, _Mapping]]] = ..., label: _Optional[str] = ..., probabilities: _Optional[_Mapping[str, float]] = ...) -> None: ...

class Explanation(_message.Message):
    __slots__ = ("slots", "windows")
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_FIELD_NUMBER: _ClassVar[int]
    slots: _containers.RepeatedCompositeFieldContainer[Slot]
    windows: _containers.RepeatedCompositeFieldContainer[WindowScore]
    def __init__(self, slots: _Optional[_Iterable[_Union[Slot, _Mapping]]] = ..., windows: _Optional[_Iterable[_Union[WindowScore, _Mapping]]] = ...) -> None: ...

class SentimentPrediction(_message.Message):
    __slots__ = ("label", "score", "probabilities", "tokens", "unknown_tokens", "windows", "explanation")
    class ProbabilitiesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_FIELD_NUMBER: _ClassVar[int]
    EXPLANATION_FIELD_NUMBER: _ClassVar[int]
    label: str
    score: float
    probabilities: _containers.ScalarMap[str, float]
    tokens: int
    unknown_tokens: int
    windows: int
    explanation: Explanation
    def __init__(self, label: _Optional[str] = ..., score: _Optional[float] = ..., probabilities: _Optional[_Mapping[str, float]] = ..., tokens: _Optional[int] = ..., unknown_tokens: _Optional[int] = ..., windows: _Optional[int] = ..., explanation: _Optional[_Union[Explanation, _Mapping]] = ...) -> None: ...

class SentimentResponse(_message.Message):
    __slots__ = ("model", "predictions")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    predictions: _containers.RepeatedCompositeFieldContainer[SentimentPrediction]
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., predictions: _Optional[_Iterable[_Union[SentimentPrediction, _Mapping]]] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("raw", "encoded")
    RAW_FIELD_NUMBER: _ClassVar[int]
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    raw: bytes
    encoded: bytes
    def __init__(self, raw: _Optional[bytes] = ..., encoded: _Optional[bytes] = ...) -> None: ...

class DigitsRequest(_message.Message):
    __slots__ = ("images", "model", "version", "version_label", "explain")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSION_LABEL_FIELD_NUMBER: _ClassVar[int]
    EXPLAIN_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[Image]
    model: str
    version: int
    version_label: str
    explain: bool
    def __init__(self, images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., model: _Optional[str] = ..., version: _Optional[int] = ..., version_label: _Optional[str] = ..., explain: _Optional[bool] = ...) -> None: ...

class DigitPrediction(_message.Message):
    __slots__ = ("label", "score", "probabilities", "image")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    label: int
    score: float
    probabilities: _containers.RepeatedScalarFieldContainer[float]
    image: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, label: _Optional[int] = ..., score: _Optional[float] = ..., probabilities: _Optional[_Iterable[float]] = ..., image: _Optional[_Iterable[float]] = ...) -> None: ...

class DigitsResponse(_message.Message):
    __slots__ = ("model", "predictions")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    predictions: _containers.RepeatedCompositeFieldContainer[DigitPrediction]
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., predictions: _Optional[_Iterable[_Union[DigitPrediction, _Mapping]]] = ...) -> None: ...
