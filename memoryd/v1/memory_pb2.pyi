from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    INT64: _ClassVar[DType]
    INT32: _ClassVar[DType]

class Metric(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    METRIC_UNSPECIFIED: _ClassVar[Metric]
    L2: _ClassVar[Metric]
    IP: _ClassVar[Metric]

class BankKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KIND_UNSPECIFIED: _ClassVar[BankKind]
    BASE: _ClassVar[BankKind]
    DOMAIN: _ClassVar[BankKind]
    SESSION: _ClassVar[BankKind]

class Ack(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACK_DEFAULT: _ClassVar[Ack]
    ACK_APPLIED: _ClassVar[Ack]
    ACK_DURABLE: _ClassVar[Ack]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT16: DType
BFLOAT16: DType
INT64: DType
INT32: DType
METRIC_UNSPECIFIED: Metric
L2: Metric
IP: Metric
KIND_UNSPECIFIED: BankKind
BASE: BankKind
DOMAIN: BankKind
SESSION: BankKind
ACK_DEFAULT: Ack
ACK_APPLIED: Ack
ACK_DURABLE: Ack

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data", "buffer_offset")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    BUFFER_OFFSET_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    buffer_offset: int
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., buffer_offset: _Optional[int] = ...) -> None: ...

class BankSpec(_message.Message):
    __slots__ = ("name", "kind", "dim", "value_dim", "value_dtype", "metric", "index", "shards", "quota_bytes", "tenant", "tier", "eviction", "key_version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    VALUE_DIM_FIELD_NUMBER: _ClassVar[int]
    VALUE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    QUOTA_BYTES_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    EVICTION_FIELD_NUMBER: _ClassVar[int]
    KEY_VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: BankKind
    dim: int
    value_dim: int
    value_dtype: DType
    metric: Metric
    index: str
    shards: int
    quota_bytes: int
    tenant: str
    tier: str
    eviction: str
    key_version: str
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[_Union[BankKind, str]] = ..., dim: _Optional[int] = ..., value_dim: _Optional[int] = ..., value_dtype: _Optional[_Union[DType, str]] = ..., metric: _Optional[_Union[Metric, str]] = ..., index: _Optional[str] = ..., shards: _Optional[int] = ..., quota_bytes: _Optional[int] = ..., tenant: _Optional[str] = ..., tier: _Optional[str] = ..., eviction: _Optional[str] = ..., key_version: _Optional[str] = ...) -> None: ...

class BankInfo(_message.Message):
    __slots__ = ("spec", "count", "used_bytes", "frozen", "trained", "checksum", "created_at", "updated_at", "tier_bytes", "data_bytes")
    class TierBytesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    SPEC_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    FROZEN_FIELD_NUMBER: _ClassVar[int]
    TRAINED_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    TIER_BYTES_FIELD_NUMBER: _ClassVar[int]
    DATA_BYTES_FIELD_NUMBER: _ClassVar[int]
    spec: BankSpec
    count: int
    used_bytes: int
    frozen: bool
    trained: bool
    checksum: str
    created_at: float
    updated_at: float
    tier_bytes: _containers.ScalarMap[str, int]
    data_bytes: int
    def __init__(self, spec: _Optional[_Union[BankSpec, _Mapping]] = ..., count: _Optional[int] = ..., used_bytes: _Optional[int] = ..., frozen: _Optional[bool] = ..., trained: _Optional[bool] = ..., checksum: _Optional[str] = ..., created_at: _Optional[float] = ..., updated_at: _Optional[float] = ..., tier_bytes: _Optional[_Mapping[str, int]] = ..., data_bytes: _Optional[int] = ...) -> None: ...

class CreateBankRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: BankSpec
    def __init__(self, spec: _Optional[_Union[BankSpec, _Mapping]] = ...) -> None: ...

class BankRef(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListBanksRequest(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    def __init__(self, tenant: _Optional[str] = ...) -> None: ...

class ListBanksResponse(_message.Message):
    __slots__ = ("banks",)
    BANKS_FIELD_NUMBER: _ClassVar[int]
    banks: _containers.RepeatedCompositeFieldContainer[BankInfo]
    def __init__(self, banks: _Optional[_Iterable[_Union[BankInfo, _Mapping]]] = ...) -> None: ...

class DeleteBankResponse(_message.Message):
    __slots__ = ("released_bytes",)
    RELEASED_BYTES_FIELD_NUMBER: _ClassVar[int]
    released_bytes: int
    def __init__(self, released_bytes: _Optional[int] = ...) -> None: ...

class SetQuotaRequest(_message.Message):
    __slots__ = ("name", "quota_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    QUOTA_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    quota_bytes: int
    def __init__(self, name: _Optional[str] = ..., quota_bytes: _Optional[int] = ...) -> None: ...

class SetTierRequest(_message.Message):
    __slots__ = ("name", "tier")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    name: str
    tier: str
    def __init__(self, name: _Optional[str] = ..., tier: _Optional[str] = ...) -> None: ...

class AddRequest(_message.Message):
    __slots__ = ("bank", "keys", "values", "ids", "ack")
    BANK_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    bank: str
    keys: Tensor
    values: Tensor
    ids: Tensor
    ack: Ack
    def __init__(self, bank: _Optional[str] = ..., keys: _Optional[_Union[Tensor, _Mapping]] = ..., values: _Optional[_Union[Tensor, _Mapping]] = ..., ids: _Optional[_Union[Tensor, _Mapping]] = ..., ack: _Optional[_Union[Ack, str]] = ...) -> None: ...

class AddResponse(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: Tensor
    def __init__(self, ids: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class BankQuery(_message.Message):
    __slots__ = ("name", "k", "bias", "exclude")
    NAME_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    BIAS_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_FIELD_NUMBER: _ClassVar[int]
    name: str
    k: int
    bias: float
    exclude: bool
    def __init__(self, name: _Optional[str] = ..., k: _Optional[int] = ..., bias: _Optional[float] = ..., exclude: _Optional[bool] = ...) -> None: ...

class RowStack(_message.Message):
    __slots__ = ("stack", "rows")
    STACK_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    stack: _containers.RepeatedCompositeFieldContainer[BankQuery]
    rows: int
    def __init__(self, stack: _Optional[_Iterable[_Union[BankQuery, _Mapping]]] = ..., rows: _Optional[int] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("banks", "queries", "k", "values", "keys", "stack", "reply_buffer", "row_stacks")
    BANKS_FIELD_NUMBER: _ClassVar[int]
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    STACK_FIELD_NUMBER: _ClassVar[int]
    REPLY_BUFFER_FIELD_NUMBER: _ClassVar[int]
    ROW_STACKS_FIELD_NUMBER: _ClassVar[int]
    banks: _containers.RepeatedScalarFieldContainer[str]
    queries: Tensor
    k: int
    values: bool
    keys: bool
    stack: _containers.RepeatedCompositeFieldContainer[BankQuery]
    reply_buffer: str
    row_stacks: _containers.RepeatedCompositeFieldContainer[RowStack]
    def __init__(self, banks: _Optional[_Iterable[str]] = ..., queries: _Optional[_Union[Tensor, _Mapping]] = ..., k: _Optional[int] = ..., values: _Optional[bool] = ..., keys: _Optional[bool] = ..., stack: _Optional[_Iterable[_Union[BankQuery, _Mapping]]] = ..., reply_buffer: _Optional[str] = ..., row_stacks: _Optional[_Iterable[_Union[RowStack, _Mapping]]] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("offset", "ids", "scores", "bank", "values", "keys", "missing_shards")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    BANK_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    MISSING_SHARDS_FIELD_NUMBER: _ClassVar[int]
    offset: int
    ids: Tensor
    scores: Tensor
    bank: Tensor
    values: Tensor
    keys: Tensor
    missing_shards: Tensor
    def __init__(self, offset: _Optional[int] = ..., ids: _Optional[_Union[Tensor, _Mapping]] = ..., scores: _Optional[_Union[Tensor, _Mapping]] = ..., bank: _Optional[_Union[Tensor, _Mapping]] = ..., values: _Optional[_Union[Tensor, _Mapping]] = ..., keys: _Optional[_Union[Tensor, _Mapping]] = ..., missing_shards: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("bank", "ids", "values", "keys")
    BANK_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    bank: str
    ids: Tensor
    values: bool
    keys: bool
    def __init__(self, bank: _Optional[str] = ..., ids: _Optional[_Union[Tensor, _Mapping]] = ..., values: _Optional[bool] = ..., keys: _Optional[bool] = ...) -> None: ...

class GetResponse(_message.Message):
    __slots__ = ("offset", "found", "values", "keys")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    FOUND_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    offset: int
    found: Tensor
    values: Tensor
    keys: Tensor
    def __init__(self, offset: _Optional[int] = ..., found: _Optional[_Union[Tensor, _Mapping]] = ..., values: _Optional[_Union[Tensor, _Mapping]] = ..., keys: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class UpdateValuesRequest(_message.Message):
    __slots__ = ("bank", "ids", "values", "ack")
    BANK_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    bank: str
    ids: Tensor
    values: Tensor
    ack: Ack
    def __init__(self, bank: _Optional[str] = ..., ids: _Optional[_Union[Tensor, _Mapping]] = ..., values: _Optional[_Union[Tensor, _Mapping]] = ..., ack: _Optional[_Union[Ack, str]] = ...) -> None: ...

class UpdateValuesResponse(_message.Message):
    __slots__ = ("updated",)
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    updated: int
    def __init__(self, updated: _Optional[int] = ...) -> None: ...

class RemoveRequest(_message.Message):
    __slots__ = ("bank", "ids", "ack")
    BANK_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    bank: str
    ids: Tensor
    ack: Ack
    def __init__(self, bank: _Optional[str] = ..., ids: _Optional[_Union[Tensor, _Mapping]] = ..., ack: _Optional[_Union[Ack, str]] = ...) -> None: ...

class RemoveResponse(_message.Message):
    __slots__ = ("removed",)
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    removed: int
    def __init__(self, removed: _Optional[int] = ...) -> None: ...

class ExportRequest(_message.Message):
    __slots__ = ("bank", "chunk_rows")
    BANK_FIELD_NUMBER: _ClassVar[int]
    CHUNK_ROWS_FIELD_NUMBER: _ClassVar[int]
    bank: str
    chunk_rows: int
    def __init__(self, bank: _Optional[str] = ..., chunk_rows: _Optional[int] = ...) -> None: ...

class ExportChunk(_message.Message):
    __slots__ = ("ids", "keys", "values")
    IDS_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    ids: Tensor
    keys: Tensor
    values: Tensor
    def __init__(self, ids: _Optional[_Union[Tensor, _Mapping]] = ..., keys: _Optional[_Union[Tensor, _Mapping]] = ..., values: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class SessionSpec(_message.Message):
    __slots__ = ("dim", "value_dim", "value_dtype", "metric", "tenant", "ttl_idle_s", "ttl_absolute_s", "quota_bytes", "eviction")
    DIM_FIELD_NUMBER: _ClassVar[int]
    VALUE_DIM_FIELD_NUMBER: _ClassVar[int]
    VALUE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    TTL_IDLE_S_FIELD_NUMBER: _ClassVar[int]
    TTL_ABSOLUTE_S_FIELD_NUMBER: _ClassVar[int]
    QUOTA_BYTES_FIELD_NUMBER: _ClassVar[int]
    EVICTION_FIELD_NUMBER: _ClassVar[int]
    dim: int
    value_dim: int
    value_dtype: DType
    metric: Metric
    tenant: str
    ttl_idle_s: float
    ttl_absolute_s: float
    quota_bytes: int
    eviction: str
    def __init__(self, dim: _Optional[int] = ..., value_dim: _Optional[int] = ..., value_dtype: _Optional[_Union[DType, str]] = ..., metric: _Optional[_Union[Metric, str]] = ..., tenant: _Optional[str] = ..., ttl_idle_s: _Optional[float] = ..., ttl_absolute_s: _Optional[float] = ..., quota_bytes: _Optional[int] = ..., eviction: _Optional[str] = ...) -> None: ...

class OpenSessionRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: SessionSpec
    def __init__(self, spec: _Optional[_Union[SessionSpec, _Mapping]] = ...) -> None: ...

class SessionInfo(_message.Message):
    __slots__ = ("session_id", "tenant", "created_at", "last_used_at", "expires_at", "ttl_idle_s", "ttl_absolute_s", "bank")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    TTL_IDLE_S_FIELD_NUMBER: _ClassVar[int]
    TTL_ABSOLUTE_S_FIELD_NUMBER: _ClassVar[int]
    BANK_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    tenant: str
    created_at: float
    last_used_at: float
    expires_at: float
    ttl_idle_s: float
    ttl_absolute_s: float
    bank: BankInfo
    def __init__(self, session_id: _Optional[str] = ..., tenant: _Optional[str] = ..., created_at: _Optional[float] = ..., last_used_at: _Optional[float] = ..., expires_at: _Optional[float] = ..., ttl_idle_s: _Optional[float] = ..., ttl_absolute_s: _Optional[float] = ..., bank: _Optional[_Union[BankInfo, _Mapping]] = ...) -> None: ...

class SessionRef(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class ListSessionsRequest(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    def __init__(self, tenant: _Optional[str] = ...) -> None: ...

class ListSessionsResponse(_message.Message):
    __slots__ = ("sessions",)
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedCompositeFieldContainer[SessionInfo]
    def __init__(self, sessions: _Optional[_Iterable[_Union[SessionInfo, _Mapping]]] = ...) -> None: ...

class AppendRequest(_message.Message):
    __slots__ = ("session_id", "keys", "values", "scores", "ack")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    keys: Tensor
    values: Tensor
    scores: Tensor
    ack: Ack
    def __init__(self, session_id: _Optional[str] = ..., keys: _Optional[_Union[Tensor, _Mapping]] = ..., values: _Optional[_Union[Tensor, _Mapping]] = ..., scores: _Optional[_Union[Tensor, _Mapping]] = ..., ack: _Optional[_Union[Ack, str]] = ...) -> None: ...

class AppendResponse(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: Tensor
    def __init__(self, ids: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ExtendSessionRequest(_message.Message):
    __slots__ = ("session_id", "ttl_idle_s", "ttl_absolute_s")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TTL_IDLE_S_FIELD_NUMBER: _ClassVar[int]
    TTL_ABSOLUTE_S_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    ttl_idle_s: float
    ttl_absolute_s: float
    def __init__(self, session_id: _Optional[str] = ..., ttl_idle_s: _Optional[float] = ..., ttl_absolute_s: _Optional[float] = ...) -> None: ...

class CloseSessionResponse(_message.Message):
    __slots__ = ("released_bytes",)
    RELEASED_BYTES_FIELD_NUMBER: _ClassVar[int]
    released_bytes: int
    def __init__(self, released_bytes: _Optional[int] = ...) -> None: ...

class PromoteSessionRequest(_message.Message):
    __slots__ = ("session_id", "target", "ids", "min_score", "dedup", "move", "ack")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    MIN_SCORE_FIELD_NUMBER: _ClassVar[int]
    DEDUP_FIELD_NUMBER: _ClassVar[int]
    MOVE_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    target: str
    ids: Tensor
    min_score: float
    dedup: float
    move: bool
    ack: Ack
    def __init__(self, session_id: _Optional[str] = ..., target: _Optional[str] = ..., ids: _Optional[_Union[Tensor, _Mapping]] = ..., min_score: _Optional[float] = ..., dedup: _Optional[float] = ..., move: _Optional[bool] = ..., ack: _Optional[_Union[Ack, str]] = ...) -> None: ...

class PromoteSessionResponse(_message.Message):
    __slots__ = ("promoted", "duplicates", "target_ids", "source_ids", "moved")
    PROMOTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    TARGET_IDS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_IDS_FIELD_NUMBER: _ClassVar[int]
    MOVED_FIELD_NUMBER: _ClassVar[int]
    promoted: int
    duplicates: int
    target_ids: Tensor
    source_ids: Tensor
    moved: bool
    def __init__(self, promoted: _Optional[int] = ..., duplicates: _Optional[int] = ..., target_ids: _Optional[_Union[Tensor, _Mapping]] = ..., source_ids: _Optional[_Union[Tensor, _Mapping]] = ..., moved: _Optional[bool] = ...) -> None: ...

class TenantInfo(_message.Message):
    __slots__ = ("name", "quota_bytes", "used_bytes", "banks", "sessions", "tier_bytes")
    class TierBytesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    QUOTA_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    BANKS_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    TIER_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    quota_bytes: int
    used_bytes: int
    banks: int
    sessions: int
    tier_bytes: _containers.ScalarMap[str, int]
    def __init__(self, name: _Optional[str] = ..., quota_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., banks: _Optional[int] = ..., sessions: _Optional[int] = ..., tier_bytes: _Optional[_Mapping[str, int]] = ...) -> None: ...

class TenantRef(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class SetTenantQuotaRequest(_message.Message):
    __slots__ = ("tenant", "quota_bytes")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    QUOTA_BYTES_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    quota_bytes: int
    def __init__(self, tenant: _Optional[str] = ..., quota_bytes: _Optional[int] = ...) -> None: ...

class ListTenantsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListTenantsResponse(_message.Message):
    __slots__ = ("tenants",)
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    tenants: _containers.RepeatedCompositeFieldContainer[TenantInfo]
    def __init__(self, tenants: _Optional[_Iterable[_Union[TenantInfo, _Mapping]]] = ...) -> None: ...

class StackUse(_message.Message):
    __slots__ = ("client", "banks", "searches", "last_used_at")
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    BANKS_FIELD_NUMBER: _ClassVar[int]
    SEARCHES_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_AT_FIELD_NUMBER: _ClassVar[int]
    client: str
    banks: _containers.RepeatedScalarFieldContainer[str]
    searches: int
    last_used_at: float
    def __init__(self, client: _Optional[str] = ..., banks: _Optional[_Iterable[str]] = ..., searches: _Optional[int] = ..., last_used_at: _Optional[float] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("version", "data_dir", "catalog_url", "uptime_s", "banks", "used_bytes", "num_gpus", "stacks", "tenants")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DATA_DIR_FIELD_NUMBER: _ClassVar[int]
    CATALOG_URL_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    BANKS_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_GPUS_FIELD_NUMBER: _ClassVar[int]
    STACKS_FIELD_NUMBER: _ClassVar[int]
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    version: str
    data_dir: str
    catalog_url: str
    uptime_s: float
    banks: _containers.RepeatedCompositeFieldContainer[BankInfo]
    used_bytes: int
    num_gpus: int
    stacks: _containers.RepeatedCompositeFieldContainer[StackUse]
    tenants: _containers.RepeatedCompositeFieldContainer[TenantInfo]
    def __init__(self, version: _Optional[str] = ..., data_dir: _Optional[str] = ..., catalog_url: _Optional[str] = ..., uptime_s: _Optional[float] = ..., banks: _Optional[_Iterable[_Union[BankInfo, _Mapping]]] = ..., used_bytes: _Optional[int] = ..., num_gpus: _Optional[int] = ..., stacks: _Optional[_Iterable[_Union[StackUse, _Mapping]]] = ..., tenants: _Optional[_Iterable[_Union[TenantInfo, _Mapping]]] = ...) -> None: ...

class OpenReplyBufferRequest(_message.Message):
    __slots__ = ("size_bytes",)
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    size_bytes: int
    def __init__(self, size_bytes: _Optional[int] = ...) -> None: ...

class ReplyBuffer(_message.Message):
    __slots__ = ("handle", "path", "size_bytes", "data_offset", "idle_timeout_s")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DATA_OFFSET_FIELD_NUMBER: _ClassVar[int]
    IDLE_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    handle: str
    path: str
    size_bytes: int
    data_offset: int
    idle_timeout_s: float
    def __init__(self, handle: _Optional[str] = ..., path: _Optional[str] = ..., size_bytes: _Optional[int] = ..., data_offset: _Optional[int] = ..., idle_timeout_s: _Optional[float] = ...) -> None: ...

class ReplyBufferRef(_message.Message):
    __slots__ = ("handle",)
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    handle: str
    def __init__(self, handle: _Optional[str] = ...) -> None: ...

class CloseReplyBufferResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PingRequest(_message.Message):
    __slots__ = ("payload",)
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    def __init__(self, payload: _Optional[bytes] = ...) -> None: ...

class PingResponse(_message.Message):
    __slots__ = ("payload",)
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    def __init__(self, payload: _Optional[bytes] = ...) -> None: ...

class Token(_message.Message):
    __slots__ = ("id", "name", "tenant", "role", "created_at", "revoked_at")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    REVOKED_AT_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    tenant: str
    role: str
    created_at: float
    revoked_at: float
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., tenant: _Optional[str] = ..., role: _Optional[str] = ..., created_at: _Optional[float] = ..., revoked_at: _Optional[float] = ...) -> None: ...

class CreateTokenRequest(_message.Message):
    __slots__ = ("tenant", "role", "name")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    role: str
    name: str
    def __init__(self, tenant: _Optional[str] = ..., role: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class CreateTokenResponse(_message.Message):
    __slots__ = ("info", "token")
    INFO_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    info: Token
    token: str
    def __init__(self, info: _Optional[_Union[Token, _Mapping]] = ..., token: _Optional[str] = ...) -> None: ...

class ListTokensRequest(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    def __init__(self, tenant: _Optional[str] = ...) -> None: ...

class ListTokensResponse(_message.Message):
    __slots__ = ("tokens",)
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[Token]
    def __init__(self, tokens: _Optional[_Iterable[_Union[Token, _Mapping]]] = ...) -> None: ...

class RevokeTokenRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class SnapshotBankRequest(_message.Message):
    __slots__ = ("name", "path")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    name: str
    path: str
    def __init__(self, name: _Optional[str] = ..., path: _Optional[str] = ...) -> None: ...

class RestoreBankRequest(_message.Message):
    __slots__ = ("path", "name")
    PATH_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    path: str
    name: str
    def __init__(self, path: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class BackupRequest(_message.Message):
    __slots__ = ("path",)
    PATH_FIELD_NUMBER: _ClassVar[int]
    path: str
    def __init__(self, path: _Optional[str] = ...) -> None: ...

class SnapshotInfo(_message.Message):
    __slots__ = ("path", "bank", "count", "used_bytes", "checksum", "banks")
    PATH_FIELD_NUMBER: _ClassVar[int]
    BANK_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    BANKS_FIELD_NUMBER: _ClassVar[int]
    path: str
    bank: str
    count: int
    used_bytes: int
    checksum: str
    banks: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, path: _Optional[str] = ..., bank: _Optional[str] = ..., count: _Optional[int] = ..., used_bytes: _Optional[int] = ..., checksum: _Optional[str] = ..., banks: _Optional[_Iterable[str]] = ...) -> None: ...
