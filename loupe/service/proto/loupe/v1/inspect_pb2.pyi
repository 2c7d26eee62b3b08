from loupe.service.proto.loupe.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ListRunsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Run(_message.Message):
    __slots__ = ("run_id", "path", "env", "policy", "checkpoints", "redis_reachable")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    REDIS_REACHABLE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    path: str
    env: str
    policy: str
    checkpoints: int
    redis_reachable: bool
    def __init__(self, run_id: _Optional[str] = ..., path: _Optional[str] = ..., env: _Optional[str] = ..., policy: _Optional[str] = ..., checkpoints: _Optional[int] = ..., redis_reachable: _Optional[bool] = ...) -> None: ...

class ListRunsReply(_message.Message):
    __slots__ = ("runs",)
    RUNS_FIELD_NUMBER: _ClassVar[int]
    runs: _containers.RepeatedCompositeFieldContainer[Run]
    def __init__(self, runs: _Optional[_Iterable[_Union[Run, _Mapping]]] = ...) -> None: ...

class ListCheckpointsRequest(_message.Message):
    __slots__ = ("run",)
    RUN_FIELD_NUMBER: _ClassVar[int]
    run: str
    def __init__(self, run: _Optional[str] = ...) -> None: ...

class Checkpoint(_message.Message):
    __slots__ = ("name", "step", "sha256", "created", "policy", "env")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    name: str
    step: int
    sha256: str
    created: str
    policy: str
    env: str
    def __init__(self, name: _Optional[str] = ..., step: _Optional[int] = ..., sha256: _Optional[str] = ..., created: _Optional[str] = ..., policy: _Optional[str] = ..., env: _Optional[str] = ...) -> None: ...

class ListCheckpointsReply(_message.Message):
    __slots__ = ("checkpoints",)
    CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    checkpoints: _containers.RepeatedCompositeFieldContainer[Checkpoint]
    def __init__(self, checkpoints: _Optional[_Iterable[_Union[Checkpoint, _Mapping]]] = ...) -> None: ...

class WatchCheckpointsRequest(_message.Message):
    __slots__ = ("run", "after_id")
    RUN_FIELD_NUMBER: _ClassVar[int]
    AFTER_ID_FIELD_NUMBER: _ClassVar[int]
    run: str
    after_id: str
    def __init__(self, run: _Optional[str] = ..., after_id: _Optional[str] = ...) -> None: ...

class CheckpointEvent(_message.Message):
    __slots__ = ("entry_id", "step", "uri", "sha256", "policy", "env", "announced", "extras_json")
    ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    ANNOUNCED_FIELD_NUMBER: _ClassVar[int]
    EXTRAS_JSON_FIELD_NUMBER: _ClassVar[int]
    entry_id: str
    step: int
    uri: str
    sha256: str
    policy: str
    env: str
    announced: float
    extras_json: str
    def __init__(self, entry_id: _Optional[str] = ..., step: _Optional[int] = ..., uri: _Optional[str] = ..., sha256: _Optional[str] = ..., policy: _Optional[str] = ..., env: _Optional[str] = ..., announced: _Optional[float] = ..., extras_json: _Optional[str] = ...) -> None: ...

class GetProbeSummaryRequest(_message.Message):
    __slots__ = ("checkpoint",)
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    checkpoint: _tensor_pb2.CheckpointRef
    def __init__(self, checkpoint: _Optional[_Union[_tensor_pb2.CheckpointRef, _Mapping]] = ...) -> None: ...

class ProbeSummary(_message.Message):
    __slots__ = ("step", "sha256", "summary_json")
    STEP_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_JSON_FIELD_NUMBER: _ClassVar[int]
    step: int
    sha256: str
    summary_json: str
    def __init__(self, step: _Optional[int] = ..., sha256: _Optional[str] = ..., summary_json: _Optional[str] = ...) -> None: ...

class AttributeRequest(_message.Message):
    __slots__ = ("checkpoint", "layer", "observations", "targets", "n_steps")
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    OBSERVATIONS_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    N_STEPS_FIELD_NUMBER: _ClassVar[int]
    checkpoint: _tensor_pb2.CheckpointRef
    layer: str
    observations: _tensor_pb2.Tensor
    targets: _containers.RepeatedScalarFieldContainer[str]
    n_steps: int
    def __init__(self, checkpoint: _Optional[_Union[_tensor_pb2.CheckpointRef, _Mapping]] = ..., layer: _Optional[str] = ..., observations: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., targets: _Optional[_Iterable[str]] = ..., n_steps: _Optional[int] = ...) -> None: ...

class AttributeReply(_message.Message):
    __slots__ = ("targets", "attributions", "delta", "layer")
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    targets: _containers.RepeatedScalarFieldContainer[str]
    attributions: _tensor_pb2.Tensor
    delta: _tensor_pb2.Tensor
    layer: str
    def __init__(self, targets: _Optional[_Iterable[str]] = ..., attributions: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., delta: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., layer: _Optional[str] = ...) -> None: ...
