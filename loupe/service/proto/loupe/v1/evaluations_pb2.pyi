from loupe.service.proto.loupe.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SubmitEvaluationRequest(_message.Message):
    __slots__ = ("request_id", "checkpoints", "levels", "start_level", "no_causes", "seed", "distribution_mode")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    LEVELS_FIELD_NUMBER: _ClassVar[int]
    START_LEVEL_FIELD_NUMBER: _ClassVar[int]
    NO_CAUSES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    DISTRIBUTION_MODE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    checkpoints: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.CheckpointRef]
    levels: int
    start_level: int
    no_causes: bool
    seed: int
    distribution_mode: str
    def __init__(self, request_id: _Optional[str] = ..., checkpoints: _Optional[_Iterable[_Union[_tensor_pb2.CheckpointRef, _Mapping]]] = ..., levels: _Optional[int] = ..., start_level: _Optional[int] = ..., no_causes: _Optional[bool] = ..., seed: _Optional[int] = ..., distribution_mode: _Optional[str] = ...) -> None: ...

class EvaluationRef(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class CheckpointProgress(_message.Message):
    __slots__ = ("label", "levels_done", "counts")
    class CountsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    LABEL_FIELD_NUMBER: _ClassVar[int]
    LEVELS_DONE_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    label: str
    levels_done: int
    counts: _containers.ScalarMap[str, int]
    def __init__(self, label: _Optional[str] = ..., levels_done: _Optional[int] = ..., counts: _Optional[_Mapping[str, int]] = ...) -> None: ...

class Evaluation(_message.Message):
    __slots__ = ("request_id", "state", "levels_total", "levels_done", "checkpoints", "results_json", "error", "out_dir")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[Evaluation.State]
        QUEUED: _ClassVar[Evaluation.State]
        RUNNING: _ClassVar[Evaluation.State]
        SUCCEEDED: _ClassVar[Evaluation.State]
        FAILED: _ClassVar[Evaluation.State]
        CANCELLED: _ClassVar[Evaluation.State]
    STATE_UNSPECIFIED: Evaluation.State
    QUEUED: Evaluation.State
    RUNNING: Evaluation.State
    SUCCEEDED: Evaluation.State
    FAILED: Evaluation.State
    CANCELLED: Evaluation.State
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LEVELS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    LEVELS_DONE_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    RESULTS_JSON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    OUT_DIR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    state: Evaluation.State
    levels_total: int
    levels_done: int
    checkpoints: _containers.RepeatedCompositeFieldContainer[CheckpointProgress]
    results_json: str
    error: str
    out_dir: str
    def __init__(self, request_id: _Optional[str] = ..., state: _Optional[_Union[Evaluation.State, str]] = ..., levels_total: _Optional[int] = ..., levels_done: _Optional[int] = ..., checkpoints: _Optional[_Iterable[_Union[CheckpointProgress, _Mapping]]] = ..., results_json: _Optional[str] = ..., error: _Optional[str] = ..., out_dir: _Optional[str] = ...) -> None: ...
