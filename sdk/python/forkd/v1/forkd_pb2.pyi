from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class NetworkMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NETWORK_MODE_UNSPECIFIED: _ClassVar[NetworkMode]
    NETWORK_MODE_NONE: _ClassVar[NetworkMode]
    NETWORK_MODE_NAT: _ClassVar[NetworkMode]

class SandboxState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SANDBOX_STATE_UNSPECIFIED: _ClassVar[SandboxState]
    SANDBOX_STATE_RUNNING: _ClassVar[SandboxState]
    SANDBOX_STATE_EXITED: _ClassVar[SandboxState]

class EventType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_TYPE_UNSPECIFIED: _ClassVar[EventType]
    EVENT_TYPE_CREATED: _ClassVar[EventType]
    EVENT_TYPE_BRANCHED: _ClassVar[EventType]
    EVENT_TYPE_EXITED: _ClassVar[EventType]
    EVENT_TYPE_DESTROYED: _ClassVar[EventType]
    EVENT_TYPE_SNAPSHOT_STARTED: _ClassVar[EventType]
    EVENT_TYPE_SNAPSHOT_DURABLE: _ClassVar[EventType]
    EVENT_TYPE_SNAPSHOT_FAILED: _ClassVar[EventType]
NETWORK_MODE_UNSPECIFIED: NetworkMode
NETWORK_MODE_NONE: NetworkMode
NETWORK_MODE_NAT: NetworkMode
SANDBOX_STATE_UNSPECIFIED: SandboxState
SANDBOX_STATE_RUNNING: SandboxState
SANDBOX_STATE_EXITED: SandboxState
EVENT_TYPE_UNSPECIFIED: EventType
EVENT_TYPE_CREATED: EventType
EVENT_TYPE_BRANCHED: EventType
EVENT_TYPE_EXITED: EventType
EVENT_TYPE_DESTROYED: EventType
EVENT_TYPE_SNAPSHOT_STARTED: EventType
EVENT_TYPE_SNAPSHOT_DURABLE: EventType
EVENT_TYPE_SNAPSHOT_FAILED: EventType

class CreateRequest(_message.Message):
    __slots__ = ("image", "memory_mib", "vcpus", "labels", "from_template", "template_name", "kernel", "network", "limits", "warm")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MIB_FIELD_NUMBER: _ClassVar[int]
    VCPUS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    FROM_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_NAME_FIELD_NUMBER: _ClassVar[int]
    KERNEL_FIELD_NUMBER: _ClassVar[int]
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    WARM_FIELD_NUMBER: _ClassVar[int]
    image: str
    memory_mib: int
    vcpus: int
    labels: _containers.ScalarMap[str, str]
    from_template: str
    template_name: str
    kernel: str
    network: NetworkPolicy
    limits: ResourceLimits
    warm: str
    def __init__(self, image: _Optional[str] = ..., memory_mib: _Optional[int] = ..., vcpus: _Optional[int] = ..., labels: _Optional[_Mapping[str, str]] = ..., from_template: _Optional[str] = ..., template_name: _Optional[str] = ..., kernel: _Optional[str] = ..., network: _Optional[_Union[NetworkPolicy, _Mapping]] = ..., limits: _Optional[_Union[ResourceLimits, _Mapping]] = ..., warm: _Optional[str] = ...) -> None: ...

class NetworkPolicy(_message.Message):
    __slots__ = ("mode", "allow")
    MODE_FIELD_NUMBER: _ClassVar[int]
    ALLOW_FIELD_NUMBER: _ClassVar[int]
    mode: NetworkMode
    allow: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, mode: _Optional[_Union[NetworkMode, str]] = ..., allow: _Optional[_Iterable[str]] = ...) -> None: ...

class ResourceLimits(_message.Message):
    __slots__ = ("memory_mib", "cpus", "io_bps", "io_iops", "pids")
    MEMORY_MIB_FIELD_NUMBER: _ClassVar[int]
    CPUS_FIELD_NUMBER: _ClassVar[int]
    IO_BPS_FIELD_NUMBER: _ClassVar[int]
    IO_IOPS_FIELD_NUMBER: _ClassVar[int]
    PIDS_FIELD_NUMBER: _ClassVar[int]
    memory_mib: int
    cpus: float
    io_bps: int
    io_iops: int
    pids: int
    def __init__(self, memory_mib: _Optional[int] = ..., cpus: _Optional[float] = ..., io_bps: _Optional[int] = ..., io_iops: _Optional[int] = ..., pids: _Optional[int] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("id", "include_memory")
    ID_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_MEMORY_FIELD_NUMBER: _ClassVar[int]
    id: str
    include_memory: bool
    def __init__(self, id: _Optional[str] = ..., include_memory: _Optional[bool] = ...) -> None: ...

class ListRequest(_message.Message):
    __slots__ = ("include_memory",)
    INCLUDE_MEMORY_FIELD_NUMBER: _ClassVar[int]
    include_memory: bool
    def __init__(self, include_memory: _Optional[bool] = ...) -> None: ...

class ListResponse(_message.Message):
    __slots__ = ("sandboxes",)
    SANDBOXES_FIELD_NUMBER: _ClassVar[int]
    sandboxes: _containers.RepeatedCompositeFieldContainer[Sandbox]
    def __init__(self, sandboxes: _Optional[_Iterable[_Union[Sandbox, _Mapping]]] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Sandbox(_message.Message):
    __slots__ = ("id", "state", "exit_reason", "image", "memory_mib", "vcpus", "labels", "created_unix_ms", "parent", "template", "memory", "kernel", "network", "limits", "resources", "restored_from")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    EXIT_REASON_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MIB_FIELD_NUMBER: _ClassVar[int]
    VCPUS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    KERNEL_FIELD_NUMBER: _ClassVar[int]
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    RESTORED_FROM_FIELD_NUMBER: _ClassVar[int]
    id: str
    state: SandboxState
    exit_reason: str
    image: str
    memory_mib: int
    vcpus: int
    labels: _containers.ScalarMap[str, str]
    created_unix_ms: int
    parent: str
    template: str
    memory: MemoryUsage
    kernel: str
    network: NetworkPolicy
    limits: ResourceLimits
    resources: ResourceUsage
    restored_from: str
    def __init__(self, id: _Optional[str] = ..., state: _Optional[_Union[SandboxState, str]] = ..., exit_reason: _Optional[str] = ..., image: _Optional[str] = ..., memory_mib: _Optional[int] = ..., vcpus: _Optional[int] = ..., labels: _Optional[_Mapping[str, str]] = ..., created_unix_ms: _Optional[int] = ..., parent: _Optional[str] = ..., template: _Optional[str] = ..., memory: _Optional[_Union[MemoryUsage, _Mapping]] = ..., kernel: _Optional[str] = ..., network: _Optional[_Union[NetworkPolicy, _Mapping]] = ..., limits: _Optional[_Union[ResourceLimits, _Mapping]] = ..., resources: _Optional[_Union[ResourceUsage, _Mapping]] = ..., restored_from: _Optional[str] = ...) -> None: ...

class ResourceUsage(_message.Message):
    __slots__ = ("cgroup", "memory_bytes", "memory_peak_bytes", "memory_limit_bytes", "memory_limit_hits", "oom_kills", "cpu_usage_us", "cpu_limit", "pids", "pids_limit", "io_read_bytes", "io_write_bytes", "network")
    CGROUP_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_PEAK_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_LIMIT_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_LIMIT_HITS_FIELD_NUMBER: _ClassVar[int]
    OOM_KILLS_FIELD_NUMBER: _ClassVar[int]
    CPU_USAGE_US_FIELD_NUMBER: _ClassVar[int]
    CPU_LIMIT_FIELD_NUMBER: _ClassVar[int]
    PIDS_FIELD_NUMBER: _ClassVar[int]
    PIDS_LIMIT_FIELD_NUMBER: _ClassVar[int]
    IO_READ_BYTES_FIELD_NUMBER: _ClassVar[int]
    IO_WRITE_BYTES_FIELD_NUMBER: _ClassVar[int]
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    cgroup: str
    memory_bytes: int
    memory_peak_bytes: int
    memory_limit_bytes: int
    memory_limit_hits: int
    oom_kills: int
    cpu_usage_us: int
    cpu_limit: float
    pids: int
    pids_limit: int
    io_read_bytes: int
    io_write_bytes: int
    network: str
    def __init__(self, cgroup: _Optional[str] = ..., memory_bytes: _Optional[int] = ..., memory_peak_bytes: _Optional[int] = ..., memory_limit_bytes: _Optional[int] = ..., memory_limit_hits: _Optional[int] = ..., oom_kills: _Optional[int] = ..., cpu_usage_us: _Optional[int] = ..., cpu_limit: _Optional[float] = ..., pids: _Optional[int] = ..., pids_limit: _Optional[int] = ..., io_read_bytes: _Optional[int] = ..., io_write_bytes: _Optional[int] = ..., network: _Optional[str] = ...) -> None: ...

class MemoryUsage(_message.Message):
    __slots__ = ("rss_kib", "pss_kib", "private_dirty_kib")
    RSS_KIB_FIELD_NUMBER: _ClassVar[int]
    PSS_KIB_FIELD_NUMBER: _ClassVar[int]
    PRIVATE_DIRTY_KIB_FIELD_NUMBER: _ClassVar[int]
    rss_kib: int
    pss_kib: int
    private_dirty_kib: int
    def __init__(self, rss_kib: _Optional[int] = ..., pss_kib: _Optional[int] = ..., private_dirty_kib: _Optional[int] = ...) -> None: ...

class ExecRequest(_message.Message):
    __slots__ = ("id", "args", "env", "cwd", "timeout_secs", "stdin")
    ID_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    CWD_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECS_FIELD_NUMBER: _ClassVar[int]
    STDIN_FIELD_NUMBER: _ClassVar[int]
    id: str
    args: _containers.RepeatedScalarFieldContainer[str]
    env: _containers.RepeatedScalarFieldContainer[str]
    cwd: str
    timeout_secs: float
    stdin: bytes
    def __init__(self, id: _Optional[str] = ..., args: _Optional[_Iterable[str]] = ..., env: _Optional[_Iterable[str]] = ..., cwd: _Optional[str] = ..., timeout_secs: _Optional[float] = ..., stdin: _Optional[bytes] = ...) -> None: ...

class ExecEvent(_message.Message):
    __slots__ = ("stdout", "stderr", "exit")
    STDOUT_FIELD_NUMBER: _ClassVar[int]
    STDERR_FIELD_NUMBER: _ClassVar[int]
    EXIT_FIELD_NUMBER: _ClassVar[int]
    stdout: bytes
    stderr: bytes
    exit: ExecExit
    def __init__(self, stdout: _Optional[bytes] = ..., stderr: _Optional[bytes] = ..., exit: _Optional[_Union[ExecExit, _Mapping]] = ...) -> None: ...

class ExecExit(_message.Message):
    __slots__ = ("exit_code", "signal", "timed_out", "duration_ms")
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    TIMED_OUT_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    exit_code: int
    signal: int
    timed_out: bool
    duration_ms: float
    def __init__(self, exit_code: _Optional[int] = ..., signal: _Optional[int] = ..., timed_out: _Optional[bool] = ..., duration_ms: _Optional[float] = ...) -> None: ...

class EvalRequest(_message.Message):
    __slots__ = ("id", "code", "context", "lang", "timeout_secs")
    ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    LANG_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECS_FIELD_NUMBER: _ClassVar[int]
    id: str
    code: str
    context: str
    lang: str
    timeout_secs: float
    def __init__(self, id: _Optional[str] = ..., code: _Optional[str] = ..., context: _Optional[str] = ..., lang: _Optional[str] = ..., timeout_secs: _Optional[float] = ...) -> None: ...

class EvalEvent(_message.Message):
    __slots__ = ("stdout", "stderr", "result")
    STDOUT_FIELD_NUMBER: _ClassVar[int]
    STDERR_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    stdout: bytes
    stderr: bytes
    result: EvalResult
    def __init__(self, stdout: _Optional[bytes] = ..., stderr: _Optional[bytes] = ..., result: _Optional[_Union[EvalResult, _Mapping]] = ...) -> None: ...

class EvalResult(_message.Message):
    __slots__ = ("context", "value", "json", "error", "duration_ms", "created", "restarted", "timed_out")
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    JSON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    RESTARTED_FIELD_NUMBER: _ClassVar[int]
    TIMED_OUT_FIELD_NUMBER: _ClassVar[int]
    context: str
    value: str
    json: str
    error: EvalError
    duration_ms: float
    created: bool
    restarted: bool
    timed_out: bool
    def __init__(self, context: _Optional[str] = ..., value: _Optional[str] = ..., json: _Optional[str] = ..., error: _Optional[_Union[EvalError, _Mapping]] = ..., duration_ms: _Optional[float] = ..., created: _Optional[bool] = ..., restarted: _Optional[bool] = ..., timed_out: _Optional[bool] = ...) -> None: ...

class EvalError(_message.Message):
    __slots__ = ("name", "message", "traceback")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TRACEBACK_FIELD_NUMBER: _ClassVar[int]
    name: str
    message: str
    traceback: str
    def __init__(self, name: _Optional[str] = ..., message: _Optional[str] = ..., traceback: _Optional[str] = ...) -> None: ...

class ListContextsRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ListContextsResponse(_message.Message):
    __slots__ = ("contexts",)
    CONTEXTS_FIELD_NUMBER: _ClassVar[int]
    contexts: _containers.RepeatedCompositeFieldContainer[Context]
    def __init__(self, contexts: _Optional[_Iterable[_Union[Context, _Mapping]]] = ...) -> None: ...

class Context(_message.Message):
    __slots__ = ("name", "lang", "pid", "evals", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LANG_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    EVALS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    lang: str
    pid: int
    evals: int
    version: str
    def __init__(self, name: _Optional[str] = ..., lang: _Optional[str] = ..., pid: _Optional[int] = ..., evals: _Optional[int] = ..., version: _Optional[str] = ...) -> None: ...

class CloseContextRequest(_message.Message):
    __slots__ = ("id", "name")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class CloseContextResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WriteFileRequest(_message.Message):
    __slots__ = ("id", "path", "mode", "data")
    ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    id: str
    path: str
    mode: int
    data: bytes
    def __init__(self, id: _Optional[str] = ..., path: _Optional[str] = ..., mode: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class WriteFileResponse(_message.Message):
    __slots__ = ("bytes_written",)
    BYTES_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    bytes_written: int
    def __init__(self, bytes_written: _Optional[int] = ...) -> None: ...

class ReadFileRequest(_message.Message):
    __slots__ = ("id", "path")
    ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    id: str
    path: str
    def __init__(self, id: _Optional[str] = ..., path: _Optional[str] = ...) -> None: ...

class FileChunk(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class ListDirRequest(_message.Message):
    __slots__ = ("id", "path")
    ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    id: str
    path: str
    def __init__(self, id: _Optional[str] = ..., path: _Optional[str] = ...) -> None: ...

class DirEntry(_message.Message):
    __slots__ = ("name", "kind", "size", "mode", "mtime_unix")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    MTIME_UNIX_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    size: int
    mode: int
    mtime_unix: int
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., size: _Optional[int] = ..., mode: _Optional[int] = ..., mtime_unix: _Optional[int] = ...) -> None: ...

class ListDirResponse(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[DirEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[DirEntry, _Mapping]]] = ...) -> None: ...

class BranchRequest(_message.Message):
    __slots__ = ("id", "count", "limits")
    ID_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    id: str
    count: int
    limits: ResourceLimits
    def __init__(self, id: _Optional[str] = ..., count: _Optional[int] = ..., limits: _Optional[_Union[ResourceLimits, _Mapping]] = ...) -> None: ...

class BranchResponse(_message.Message):
    __slots__ = ("source", "children", "pause_ms")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    CHILDREN_FIELD_NUMBER: _ClassVar[int]
    PAUSE_MS_FIELD_NUMBER: _ClassVar[int]
    source: str
    children: _containers.RepeatedCompositeFieldContainer[Sandbox]
    pause_ms: float
    def __init__(self, source: _Optional[str] = ..., children: _Optional[_Iterable[_Union[Sandbox, _Mapping]]] = ..., pause_ms: _Optional[float] = ...) -> None: ...

class GetConsoleRequest(_message.Message):
    __slots__ = ("id", "max_bytes")
    ID_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    id: str
    max_bytes: int
    def __init__(self, id: _Optional[str] = ..., max_bytes: _Optional[int] = ...) -> None: ...

class GetConsoleResponse(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("type", "time_unix_ms", "sandbox", "children", "pause_ms", "snapshot", "error")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    TIME_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    SANDBOX_FIELD_NUMBER: _ClassVar[int]
    CHILDREN_FIELD_NUMBER: _ClassVar[int]
    PAUSE_MS_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    type: EventType
    time_unix_ms: int
    sandbox: Sandbox
    children: _containers.RepeatedCompositeFieldContainer[Sandbox]
    pause_ms: float
    snapshot: SnapshotResult
    error: str
    def __init__(self, type: _Optional[_Union[EventType, str]] = ..., time_unix_ms: _Optional[int] = ..., sandbox: _Optional[_Union[Sandbox, _Mapping]] = ..., children: _Optional[_Iterable[_Union[Sandbox, _Mapping]]] = ..., pause_ms: _Optional[float] = ..., snapshot: _Optional[_Union[SnapshotResult, _Mapping]] = ..., error: _Optional[str] = ...) -> None: ...

class CreateSnapshotRequest(_message.Message):
    __slots__ = ("id", "tag", "diff", "wait")
    ID_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    DIFF_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    id: str
    tag: str
    diff: bool
    wait: bool
    def __init__(self, id: _Optional[str] = ..., tag: _Optional[str] = ..., diff: _Optional[bool] = ..., wait: _Optional[bool] = ...) -> None: ...

class SnapshotResult(_message.Message):
    __slots__ = ("id", "tag", "source", "kind", "parent", "pause_ms", "durable")
    ID_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    PAUSE_MS_FIELD_NUMBER: _ClassVar[int]
    DURABLE_FIELD_NUMBER: _ClassVar[int]
    id: str
    tag: str
    source: str
    kind: str
    parent: str
    pause_ms: float
    durable: bool
    def __init__(self, id: _Optional[str] = ..., tag: _Optional[str] = ..., source: _Optional[str] = ..., kind: _Optional[str] = ..., parent: _Optional[str] = ..., pause_ms: _Optional[float] = ..., durable: _Optional[bool] = ...) -> None: ...

class ListSnapshotsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListSnapshotsResponse(_message.Message):
    __slots__ = ("snapshots",)
    SNAPSHOTS_FIELD_NUMBER: _ClassVar[int]
    snapshots: _containers.RepeatedCompositeFieldContainer[SnapshotInfo]
    def __init__(self, snapshots: _Optional[_Iterable[_Union[SnapshotInfo, _Mapping]]] = ...) -> None: ...

class GetSnapshotRequest(_message.Message):
    __slots__ = ("tag",)
    TAG_FIELD_NUMBER: _ClassVar[int]
    tag: str
    def __init__(self, tag: _Optional[str] = ...) -> None: ...

class SnapshotInfo(_message.Message):
    __slots__ = ("id", "tag", "kind", "parent", "source", "created_unix_ms", "image", "memory_mib", "vcpus", "network", "limits", "labels", "memory_bytes", "pages", "nonzero_pages", "write_method", "write_ms", "disk_layers", "dependents")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MIB_FIELD_NUMBER: _ClassVar[int]
    VCPUS_FIELD_NUMBER: _ClassVar[int]
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    PAGES_FIELD_NUMBER: _ClassVar[int]
    NONZERO_PAGES_FIELD_NUMBER: _ClassVar[int]
    WRITE_METHOD_FIELD_NUMBER: _ClassVar[int]
    WRITE_MS_FIELD_NUMBER: _ClassVar[int]
    DISK_LAYERS_FIELD_NUMBER: _ClassVar[int]
    DEPENDENTS_FIELD_NUMBER: _ClassVar[int]
    id: str
    tag: str
    kind: str
    parent: str
    source: str
    created_unix_ms: int
    image: str
    memory_mib: int
    vcpus: int
    network: NetworkPolicy
    limits: ResourceLimits
    labels: _containers.ScalarMap[str, str]
    memory_bytes: int
    pages: int
    nonzero_pages: int
    write_method: str
    write_ms: float
    disk_layers: int
    dependents: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, id: _Optional[str] = ..., tag: _Optional[str] = ..., kind: _Optional[str] = ..., parent: _Optional[str] = ..., source: _Optional[str] = ..., created_unix_ms: _Optional[int] = ..., image: _Optional[str] = ..., memory_mib: _Optional[int] = ..., vcpus: _Optional[int] = ..., network: _Optional[_Union[NetworkPolicy, _Mapping]] = ..., limits: _Optional[_Union[ResourceLimits, _Mapping]] = ..., labels: _Optional[_Mapping[str, str]] = ..., memory_bytes: _Optional[int] = ..., pages: _Optional[int] = ..., nonzero_pages: _Optional[int] = ..., write_method: _Optional[str] = ..., write_ms: _Optional[float] = ..., disk_layers: _Optional[int] = ..., dependents: _Optional[_Iterable[str]] = ...) -> None: ...

class DeleteSnapshotRequest(_message.Message):
    __slots__ = ("tag", "cascade")
    TAG_FIELD_NUMBER: _ClassVar[int]
    CASCADE_FIELD_NUMBER: _ClassVar[int]
    tag: str
    cascade: bool
    def __init__(self, tag: _Optional[str] = ..., cascade: _Optional[bool] = ...) -> None: ...

class DeleteSnapshotResponse(_message.Message):
    __slots__ = ("removed",)
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    removed: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, removed: _Optional[_Iterable[str]] = ...) -> None: ...

class CompactSnapshotRequest(_message.Message):
    __slots__ = ("tag",)
    TAG_FIELD_NUMBER: _ClassVar[int]
    tag: str
    def __init__(self, tag: _Optional[str] = ...) -> None: ...

class VerifySnapshotRequest(_message.Message):
    __slots__ = ("tag",)
    TAG_FIELD_NUMBER: _ClassVar[int]
    tag: str
    def __init__(self, tag: _Optional[str] = ...) -> None: ...

class VerifySnapshotResponse(_message.Message):
    __slots__ = ("files_checked", "pages_checked", "bytes_read")
    FILES_CHECKED_FIELD_NUMBER: _ClassVar[int]
    PAGES_CHECKED_FIELD_NUMBER: _ClassVar[int]
    BYTES_READ_FIELD_NUMBER: _ClassVar[int]
    files_checked: int
    pages_checked: int
    bytes_read: int
    def __init__(self, files_checked: _Optional[int] = ..., pages_checked: _Optional[int] = ..., bytes_read: _Optional[int] = ...) -> None: ...

class RestoreRequest(_message.Message):
    __slots__ = ("snapshot_tag", "count")
    SNAPSHOT_TAG_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    snapshot_tag: str
    count: int
    def __init__(self, snapshot_tag: _Optional[str] = ..., count: _Optional[int] = ...) -> None: ...

class RestoreResponse(_message.Message):
    __slots__ = ("sandboxes",)
    SANDBOXES_FIELD_NUMBER: _ClassVar[int]
    sandboxes: _containers.RepeatedCompositeFieldContainer[Sandbox]
    def __init__(self, sandboxes: _Optional[_Iterable[_Union[Sandbox, _Mapping]]] = ...) -> None: ...

class ListImagesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListImagesResponse(_message.Message):
    __slots__ = ("images",)
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[Image]
    def __init__(self, images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("name", "kind", "size_bytes", "sha256", "created_unix")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    size_bytes: int
    sha256: str
    created_unix: int
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., created_unix: _Optional[int] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("version", "state_dir", "backend", "pid", "started_unix_ms", "max_concurrent_creates", "max_concurrent_branches", "max_sandboxes")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_DIR_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    STARTED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_CREATES_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_BRANCHES_FIELD_NUMBER: _ClassVar[int]
    MAX_SANDBOXES_FIELD_NUMBER: _ClassVar[int]
    version: str
    state_dir: str
    backend: str
    pid: int
    started_unix_ms: int
    max_concurrent_creates: int
    max_concurrent_branches: int
    max_sandboxes: int
    def __init__(self, version: _Optional[str] = ..., state_dir: _Optional[str] = ..., backend: _Optional[str] = ..., pid: _Optional[int] = ..., started_unix_ms: _Optional[int] = ..., max_concurrent_creates: _Optional[int] = ..., max_concurrent_branches: _Optional[int] = ..., max_sandboxes: _Optional[int] = ...) -> None: ...
