import datetime

from google.api import annotations_pb2 as _annotations_pb2
from google.api import client_pb2 as _client_pb2
from google.api import field_behavior_pb2 as _field_behavior_pb2
from google.api import resource_pb2 as _resource_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import empty_pb2 as _empty_pb2
from google.protobuf import field_mask_pb2 as _field_mask_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from jumpstarter_exporter._proto.jumpstarter.v1 import common_pb2 as _common_pb2
from jumpstarter_exporter._proto.jumpstarter.v1 import kubernetes_pb2 as _kubernetes_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Exporter(_message.Message):
    __slots__ = ("name", "labels", "online", "status", "status_message", "enabled", "deprecated_labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class DeprecatedLabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    ONLINE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    STATUS_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    DEPRECATED_LABELS_FIELD_NUMBER: _ClassVar[int]
    name: str
    labels: _containers.ScalarMap[str, str]
    online: bool
    status: _common_pb2.ExporterStatus
    status_message: str
    enabled: bool
    deprecated_labels: _containers.ScalarMap[str, str]
    def __init__(self, name: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., online: _Optional[bool] = ..., status: _Optional[_Union[_common_pb2.ExporterStatus, str]] = ..., status_message: _Optional[str] = ..., enabled: _Optional[bool] = ..., deprecated_labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Lease(_message.Message):
    __slots__ = ("name", "selector", "duration", "effective_duration", "begin_time", "effective_begin_time", "end_time", "effective_end_time", "client", "exporter", "conditions", "exporter_name", "tags", "allow_disabled", "context", "deprecated_labels")
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class ContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class DeprecatedLabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    DURATION_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_DURATION_FIELD_NUMBER: _ClassVar[int]
    BEGIN_TIME_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_BEGIN_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_END_TIME_FIELD_NUMBER: _ClassVar[int]
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    EXPORTER_FIELD_NUMBER: _ClassVar[int]
    CONDITIONS_FIELD_NUMBER: _ClassVar[int]
    EXPORTER_NAME_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    ALLOW_DISABLED_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    DEPRECATED_LABELS_FIELD_NUMBER: _ClassVar[int]
    name: str
    selector: str
    duration: _duration_pb2.Duration
    effective_duration: _duration_pb2.Duration
    begin_time: _timestamp_pb2.Timestamp
    effective_begin_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    effective_end_time: _timestamp_pb2.Timestamp
    client: str
    exporter: str
    conditions: _containers.RepeatedCompositeFieldContainer[_kubernetes_pb2.Condition]
    exporter_name: str
    tags: _containers.ScalarMap[str, str]
    allow_disabled: bool
    context: _containers.ScalarMap[str, str]
    deprecated_labels: _containers.ScalarMap[str, str]
    def __init__(self, name: _Optional[str] = ..., selector: _Optional[str] = ..., duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., effective_duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., begin_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., effective_begin_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., effective_end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., client: _Optional[str] = ..., exporter: _Optional[str] = ..., conditions: _Optional[_Iterable[_Union[_kubernetes_pb2.Condition, _Mapping]]] = ..., exporter_name: _Optional[str] = ..., tags: _Optional[_Mapping[str, str]] = ..., allow_disabled: _Optional[bool] = ..., context: _Optional[_Mapping[str, str]] = ..., deprecated_labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class GetExporterRequest(_message.Message):
    __slots__ = ("name", "show_hidden_labels")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHOW_HIDDEN_LABELS_FIELD_NUMBER: _ClassVar[int]
    name: str
    show_hidden_labels: bool
    def __init__(self, name: _Optional[str] = ..., show_hidden_labels: _Optional[bool] = ...) -> None: ...

class ListExportersRequest(_message.Message):
    __slots__ = ("parent", "page_size", "page_token", "filter", "show_hidden_labels")
    PARENT_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    SHOW_HIDDEN_LABELS_FIELD_NUMBER: _ClassVar[int]
    parent: str
    page_size: int
    page_token: str
    filter: str
    show_hidden_labels: bool
    def __init__(self, parent: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., filter: _Optional[str] = ..., show_hidden_labels: _Optional[bool] = ...) -> None: ...

class ListExportersResponse(_message.Message):
    __slots__ = ("exporters", "next_page_token")
    EXPORTERS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    exporters: _containers.RepeatedCompositeFieldContainer[Exporter]
    next_page_token: str
    def __init__(self, exporters: _Optional[_Iterable[_Union[Exporter, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetLeaseRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListLeasesRequest(_message.Message):
    __slots__ = ("parent", "page_size", "page_token", "filter", "only_active", "tag_filter")
    PARENT_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    ONLY_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    TAG_FILTER_FIELD_NUMBER: _ClassVar[int]
    parent: str
    page_size: int
    page_token: str
    filter: str
    only_active: bool
    tag_filter: str
    def __init__(self, parent: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., filter: _Optional[str] = ..., only_active: _Optional[bool] = ..., tag_filter: _Optional[str] = ...) -> None: ...

class ListLeasesResponse(_message.Message):
    __slots__ = ("leases", "next_page_token")
    LEASES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    leases: _containers.RepeatedCompositeFieldContainer[Lease]
    next_page_token: str
    def __init__(self, leases: _Optional[_Iterable[_Union[Lease, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CreateLeaseRequest(_message.Message):
    __slots__ = ("parent", "lease_id", "lease")
    PARENT_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    parent: str
    lease_id: str
    lease: Lease
    def __init__(self, parent: _Optional[str] = ..., lease_id: _Optional[str] = ..., lease: _Optional[_Union[Lease, _Mapping]] = ...) -> None: ...

class UpdateLeaseRequest(_message.Message):
    __slots__ = ("lease", "update_mask")
    LEASE_FIELD_NUMBER: _ClassVar[int]
    UPDATE_MASK_FIELD_NUMBER: _ClassVar[int]
    lease: Lease
    update_mask: _field_mask_pb2.FieldMask
    def __init__(self, lease: _Optional[_Union[Lease, _Mapping]] = ..., update_mask: _Optional[_Union[_field_mask_pb2.FieldMask, _Mapping]] = ...) -> None: ...

class DeleteLeaseRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class RotateTokenRequest(_message.Message):
    __slots__ = ("parent",)
    PARENT_FIELD_NUMBER: _ClassVar[int]
    parent: str
    def __init__(self, parent: _Optional[str] = ...) -> None: ...

class RotateTokenResponse(_message.Message):
    __slots__ = ("token", "expiry")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXPIRY_FIELD_NUMBER: _ClassVar[int]
    token: str
    expiry: _timestamp_pb2.Timestamp
    def __init__(self, token: _Optional[str] = ..., expiry: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
