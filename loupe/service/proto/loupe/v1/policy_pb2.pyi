from loupe.service.proto.loupe.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ActRequest(_message.Message):
    __slots__ = ("checkpoint", "observations", "greedy", "seed", "sequence")
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    OBSERVATIONS_FIELD_NUMBER: _ClassVar[int]
    GREEDY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    checkpoint: _tensor_pb2.CheckpointRef
    observations: _tensor_pb2.Tensor
    greedy: bool
    seed: int
    sequence: int
    def __init__(self, checkpoint: _Optional[_Union[_tensor_pb2.CheckpointRef, _Mapping]] = ..., observations: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., greedy: _Optional[bool] = ..., seed: _Optional[int] = ..., sequence: _Optional[int] = ...) -> None: ...

class ActReply(_message.Message):
    __slots__ = ("actions", "logits", "values", "sequence", "batch_size")
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    actions: _tensor_pb2.Tensor
    logits: _tensor_pb2.Tensor
    values: _tensor_pb2.Tensor
    sequence: int
    batch_size: int
    def __init__(self, actions: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., logits: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., values: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., sequence: _Optional[int] = ..., batch_size: _Optional[int] = ...) -> None: ...
