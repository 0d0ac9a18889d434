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

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class BankSpec(_message.Message):
    __slots__ = ("name", "kind", "dim", "value_dim", "value_dtype", "metric", "index", "shards", "quota_bytes", "tenant")
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
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[_Union[BankKind, str]] = ..., dim: _Optional[int] = ..., value_dim: _Optional[int] = ..., value_dtype: _Optional[_Union[DType, str]] = ..., metric: _Optional[_Union[Metric, str]] = ..., index: _Optional[str] = ..., shards: _Optional[int] = ..., quota_bytes: _Optional[int] = ..., tenant: _Optional[str] = ...) -> None: ...

class BankInfo(_message.Message):
    __slots__ = ("spec", "count", "used_bytes", "frozen", "trained", "checksum", "created_at", "updated_at")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    FROZEN_FIELD_NUMBER: _ClassVar[int]
    TRAINED_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    spec: BankSpec
    count: int
    used_bytes: int
    frozen: bool
    trained: bool
    checksum: str
    created_at: float
    updated_at: float
    def __init__(self, spec: _Optional[_Union[BankSpec, _Mapping]] = ..., count: _Optional[int] = ..., used_bytes: _Optional[int] = ..., frozen: _Optional[bool] = ..., trained: _Optional[bool] = ..., checksum: _Optional[str] = ..., created_at: _Optional[float] = ..., updated_at: _Optional[float] = ...) -> None: ...

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

class AddRequest(_message.Message):
    __slots__ = ("bank", "keys", "values", "ids")
    BANK_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    bank: str
    keys: Tensor
    values: Tensor
    ids: Tensor
    def __init__(self, bank: _Optional[str] = ..., keys: _Optional[_Union[Tensor, _Mapping]] = ..., values: _Optional[_Union[Tensor, _Mapping]] = ..., ids: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class AddResponse(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: Tensor
    def __init__(self, ids: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("banks", "queries", "k", "values", "keys")
    BANKS_FIELD_NUMBER: _ClassVar[int]
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    banks: _containers.RepeatedScalarFieldContainer[str]
    queries: Tensor
    k: int
    values: bool
    keys: bool
    def __init__(self, banks: _Optional[_Iterable[str]] = ..., queries: _Optional[_Union[Tensor, _Mapping]] = ..., k: _Optional[int] = ..., values: _Optional[bool] = ..., keys: _Optional[bool] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("offset", "ids", "scores", "bank", "values", "keys")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    BANK_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    offset: int
    ids: Tensor
    scores: Tensor
    bank: Tensor
    values: Tensor
    keys: Tensor
    def __init__(self, offset: _Optional[int] = ..., ids: _Optional[_Union[Tensor, _Mapping]] = ..., scores: _Optional[_Union[Tensor, _Mapping]] = ..., bank: _Optional[_Union[Tensor, _Mapping]] = ..., values: _Optional[_Union[Tensor, _Mapping]] = ..., keys: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

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
    __slots__ = ("bank", "ids", "values")
    BANK_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    bank: str
    ids: Tensor
    values: Tensor
    def __init__(self, bank: _Optional[str] = ..., ids: _Optional[_Union[Tensor, _Mapping]] = ..., values: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class UpdateValuesResponse(_message.Message):
    __slots__ = ("updated",)
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    updated: int
    def __init__(self, updated: _Optional[int] = ...) -> None: ...

class RemoveRequest(_message.Message):
    __slots__ = ("bank", "ids")
    BANK_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    bank: str
    ids: Tensor
    def __init__(self, bank: _Optional[str] = ..., ids: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

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

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("version", "data_dir", "catalog_url", "uptime_s", "banks", "used_bytes", "num_gpus")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DATA_DIR_FIELD_NUMBER: _ClassVar[int]
    CATALOG_URL_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    BANKS_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_GPUS_FIELD_NUMBER: _ClassVar[int]
    version: str
    data_dir: str
    catalog_url: str
    uptime_s: float
    banks: _containers.RepeatedCompositeFieldContainer[BankInfo]
    used_bytes: int
    num_gpus: int
    def __init__(self, version: _Optional[str] = ..., data_dir: _Optional[str] = ..., catalog_url: _Optional[str] = ..., uptime_s: _Optional[float] = ..., banks: _Optional[_Iterable[_Union[BankInfo, _Mapping]]] = ..., used_bytes: _Optional[int] = ..., num_gpus: _Optional[int] = ...) -> None: ...

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
