# ruff: noqa
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_STARTING: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_PAUSED: _ClassVar[JobState]
    JOB_STATE_STOPPING: _ClassVar[JobState]
    JOB_STATE_FINISHED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_STARTING: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_PAUSED: JobState
JOB_STATE_STOPPING: JobState
JOB_STATE_FINISHED: JobState
JOB_STATE_FAILED: JobState

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("job", "state", "step", "total_steps", "policy_version", "rollout_workers", "rollouts_per_s", "tokens_per_s", "last_step_s", "run_dir")
    JOB_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_WORKERS_FIELD_NUMBER: _ClassVar[int]
    ROLLOUTS_PER_S_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_S_FIELD_NUMBER: _ClassVar[int]
    RUN_DIR_FIELD_NUMBER: _ClassVar[int]
    job: str
    state: JobState
    step: int
    total_steps: int
    policy_version: int
    rollout_workers: int
    rollouts_per_s: float
    tokens_per_s: float
    last_step_s: float
    run_dir: str
    def __init__(self, job: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., policy_version: _Optional[int] = ..., rollout_workers: _Optional[int] = ..., rollouts_per_s: _Optional[float] = ..., tokens_per_s: _Optional[float] = ..., last_step_s: _Optional[float] = ..., run_dir: _Optional[str] = ...) -> None: ...

class GetModulatorStateRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TaskModulation(_message.Message):
    __slots__ = ("factor", "unclamped_factor", "signal", "signal_ema", "batch_share", "zero_signal_groups", "last_update_step", "in_batch")
    FACTOR_FIELD_NUMBER: _ClassVar[int]
    UNCLAMPED_FACTOR_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_EMA_FIELD_NUMBER: _ClassVar[int]
    BATCH_SHARE_FIELD_NUMBER: _ClassVar[int]
    ZERO_SIGNAL_GROUPS_FIELD_NUMBER: _ClassVar[int]
    LAST_UPDATE_STEP_FIELD_NUMBER: _ClassVar[int]
    IN_BATCH_FIELD_NUMBER: _ClassVar[int]
    factor: float
    unclamped_factor: float
    signal: float
    signal_ema: float
    batch_share: float
    zero_signal_groups: int
    last_update_step: int
    in_batch: bool
    def __init__(self, factor: _Optional[float] = ..., unclamped_factor: _Optional[float] = ..., signal: _Optional[float] = ..., signal_ema: _Optional[float] = ..., batch_share: _Optional[float] = ..., zero_signal_groups: _Optional[int] = ..., last_update_step: _Optional[int] = ..., in_batch: _Optional[bool] = ...) -> None: ...

class GetModulatorStateResponse(_message.Message):
    __slots__ = ("step", "reference", "tasks")
    class TasksEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: TaskModulation
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[TaskModulation, _Mapping]] = ...) -> None: ...
    STEP_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    step: int
    reference: float
    tasks: _containers.MessageMap[str, TaskModulation]
    def __init__(self, step: _Optional[int] = ..., reference: _Optional[float] = ..., tasks: _Optional[_Mapping[str, TaskModulation]] = ...) -> None: ...

class ScaleRolloutsRequest(_message.Message):
    __slots__ = ("workers",)
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    workers: int
    def __init__(self, workers: _Optional[int] = ...) -> None: ...

class ScaleRolloutsResponse(_message.Message):
    __slots__ = ("previous", "target")
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    previous: int
    target: int
    def __init__(self, previous: _Optional[int] = ..., target: _Optional[int] = ...) -> None: ...

class CheckpointRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CheckpointResponse(_message.Message):
    __slots__ = ("path",)
    PATH_FIELD_NUMBER: _ClassVar[int]
    path: str
    def __init__(self, path: _Optional[str] = ...) -> None: ...

class PauseRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PauseResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResumeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResumeResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StopRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StopResponse(_message.Message):
    __slots__ = ("checkpoint",)
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    checkpoint: str
    def __init__(self, checkpoint: _Optional[str] = ...) -> None: ...
