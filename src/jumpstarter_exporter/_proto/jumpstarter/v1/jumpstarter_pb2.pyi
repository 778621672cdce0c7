import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import empty_pb2 as _empty_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from jumpstarter_exporter._proto.jumpstarter.v1 import common_pb2 as _common_pb2
from jumpstarter_exporter._proto.jumpstarter.v1 import kubernetes_pb2 as _kubernetes_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DriverInstanceReport(_message.Message):
    __slots__ = ("uuid", "parent_uuid", "labels", "description", "methods_description")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class MethodsDescriptionEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    UUID_FIELD_NUMBER: _ClassVar[int]
    PARENT_UUID_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    METHODS_DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    uuid: str
    parent_uuid: str
    labels: _containers.ScalarMap[str, str]
    description: str
    methods_description: _containers.ScalarMap[str, str]
    def __init__(self, uuid: _Optional[str] = ..., parent_uuid: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., description: _Optional[str] = ..., methods_description: _Optional[_Mapping[str, str]] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("labels", "reports")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    LABELS_FIELD_NUMBER: _ClassVar[int]
    REPORTS_FIELD_NUMBER: _ClassVar[int]
    labels: _containers.ScalarMap[str, str]
    reports: _containers.RepeatedCompositeFieldContainer[DriverInstanceReport]
    def __init__(self, labels: _Optional[_Mapping[str, str]] = ..., reports: _Optional[_Iterable[_Union[DriverInstanceReport, _Mapping]]] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("uuid",)
    UUID_FIELD_NUMBER: _ClassVar[int]
    uuid: str
    def __init__(self, uuid: _Optional[str] = ...) -> None: ...

class UnregisterRequest(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class UnregisterResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListenRequest(_message.Message):
    __slots__ = ("lease_name",)
    LEASE_NAME_FIELD_NUMBER: _ClassVar[int]
    lease_name: str
    def __init__(self, lease_name: _Optional[str] = ...) -> None: ...

class ListenResponse(_message.Message):
    __slots__ = ("router_endpoint", "router_token")
    ROUTER_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    ROUTER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    router_endpoint: str
    router_token: str
    def __init__(self, router_endpoint: _Optional[str] = ..., router_token: _Optional[str] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("leased", "lease_name", "client_name", "context")
    class ContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    LEASED_FIELD_NUMBER: _ClassVar[int]
    LEASE_NAME_FIELD_NUMBER: _ClassVar[int]
    CLIENT_NAME_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    leased: bool
    lease_name: str
    client_name: str
    context: _containers.ScalarMap[str, str]
    def __init__(self, leased: _Optional[bool] = ..., lease_name: _Optional[str] = ..., client_name: _Optional[str] = ..., context: _Optional[_Mapping[str, str]] = ...) -> None: ...

class DialRequest(_message.Message):
    __slots__ = ("lease_name",)
    LEASE_NAME_FIELD_NUMBER: _ClassVar[int]
    lease_name: str
    def __init__(self, lease_name: _Optional[str] = ...) -> None: ...

class DialResponse(_message.Message):
    __slots__ = ("router_endpoint", "router_token")
    ROUTER_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    ROUTER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    router_endpoint: str
    router_token: str
    def __init__(self, router_endpoint: _Optional[str] = ..., router_token: _Optional[str] = ...) -> None: ...

class ReportStatusRequest(_message.Message):
    __slots__ = ("status", "message", "release_lease")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RELEASE_LEASE_FIELD_NUMBER: _ClassVar[int]
    status: _common_pb2.ExporterStatus
    message: str
    release_lease: bool
    def __init__(self, status: _Optional[_Union[_common_pb2.ExporterStatus, str]] = ..., message: _Optional[str] = ..., release_lease: _Optional[bool] = ...) -> None: ...

class ReportStatusResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AuditStreamRequest(_message.Message):
    __slots__ = ("exporter_uuid", "driver_instance_uuid", "severity", "message")
    EXPORTER_UUID_FIELD_NUMBER: _ClassVar[int]
    DRIVER_INSTANCE_UUID_FIELD_NUMBER: _ClassVar[int]
    SEVERITY_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    exporter_uuid: str
    driver_instance_uuid: str
    severity: str
    message: str
    def __init__(self, exporter_uuid: _Optional[str] = ..., driver_instance_uuid: _Optional[str] = ..., severity: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class GetLeaseRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class GetLeaseResponse(_message.Message):
    __slots__ = ("duration", "selector", "begin_time", "end_time", "exporter_uuid", "conditions")
    DURATION_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    BEGIN_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    EXPORTER_UUID_FIELD_NUMBER: _ClassVar[int]
    CONDITIONS_FIELD_NUMBER: _ClassVar[int]
    duration: _duration_pb2.Duration
    selector: _kubernetes_pb2.LabelSelector
    begin_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    exporter_uuid: str
    conditions: _containers.RepeatedCompositeFieldContainer[_kubernetes_pb2.Condition]
    def __init__(self, duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., selector: _Optional[_Union[_kubernetes_pb2.LabelSelector, _Mapping]] = ..., begin_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., exporter_uuid: _Optional[str] = ..., conditions: _Optional[_Iterable[_Union[_kubernetes_pb2.Condition, _Mapping]]] = ...) -> None: ...

class RequestLeaseRequest(_message.Message):
    __slots__ = ("duration", "selector")
    DURATION_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    duration: _duration_pb2.Duration
    selector: _kubernetes_pb2.LabelSelector
    def __init__(self, duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., selector: _Optional[_Union[_kubernetes_pb2.LabelSelector, _Mapping]] = ...) -> None: ...

class RequestLeaseResponse(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ReleaseLeaseRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ReleaseLeaseResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListLeasesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListLeasesResponse(_message.Message):
    __slots__ = ("names",)
    NAMES_FIELD_NUMBER: _ClassVar[int]
    names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, names: _Optional[_Iterable[str]] = ...) -> None: ...

class GetServiceEndpointsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetServiceEndpointsResponse(_message.Message):
    __slots__ = ("telemetry_endpoints",)
    TELEMETRY_ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    telemetry_endpoints: _containers.RepeatedCompositeFieldContainer[TelemetryEndpoint]
    def __init__(self, telemetry_endpoints: _Optional[_Iterable[_Union[TelemetryEndpoint, _Mapping]]] = ...) -> None: ...

class TelemetryEndpoint(_message.Message):
    __slots__ = ("endpoint", "certificate", "min_severity")
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    MIN_SEVERITY_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    certificate: str
    min_severity: str
    def __init__(self, endpoint: _Optional[str] = ..., certificate: _Optional[str] = ..., min_severity: _Optional[str] = ...) -> None: ...

class Endpoint(_message.Message):
    __slots__ = ("endpoint", "certificate", "client_certificate", "client_private_key")
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    CLIENT_CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    CLIENT_PRIVATE_KEY_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    certificate: str
    client_certificate: str
    client_private_key: str
    def __init__(self, endpoint: _Optional[str] = ..., certificate: _Optional[str] = ..., client_certificate: _Optional[str] = ..., client_private_key: _Optional[str] = ...) -> None: ...

class GetReportResponse(_message.Message):
    __slots__ = ("uuid", "labels", "reports", "alternative_endpoints", "motd")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    UUID_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    REPORTS_FIELD_NUMBER: _ClassVar[int]
    ALTERNATIVE_ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    MOTD_FIELD_NUMBER: _ClassVar[int]
    uuid: str
    labels: _containers.ScalarMap[str, str]
    reports: _containers.RepeatedCompositeFieldContainer[DriverInstanceReport]
    alternative_endpoints: _containers.RepeatedCompositeFieldContainer[Endpoint]
    motd: str
    def __init__(self, uuid: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., reports: _Optional[_Iterable[_Union[DriverInstanceReport, _Mapping]]] = ..., alternative_endpoints: _Optional[_Iterable[_Union[Endpoint, _Mapping]]] = ..., motd: _Optional[str] = ...) -> None: ...

class DriverCallRequest(_message.Message):
    __slots__ = ("uuid", "method", "args")
    UUID_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    uuid: str
    method: str
    args: _containers.RepeatedCompositeFieldContainer[_struct_pb2.Value]
    def __init__(self, uuid: _Optional[str] = ..., method: _Optional[str] = ..., args: _Optional[_Iterable[_Union[_struct_pb2.Value, _Mapping]]] = ...) -> None: ...

class DriverCallResponse(_message.Message):
    __slots__ = ("uuid", "result")
    UUID_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    uuid: str
    result: _struct_pb2.Value
    def __init__(self, uuid: _Optional[str] = ..., result: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ...) -> None: ...

class StreamingDriverCallRequest(_message.Message):
    __slots__ = ("uuid", "method", "args")
    UUID_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    uuid: str
    method: str
    args: _containers.RepeatedCompositeFieldContainer[_struct_pb2.Value]
    def __init__(self, uuid: _Optional[str] = ..., method: _Optional[str] = ..., args: _Optional[_Iterable[_Union[_struct_pb2.Value, _Mapping]]] = ...) -> None: ...

class StreamingDriverCallResponse(_message.Message):
    __slots__ = ("uuid", "result")
    UUID_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    uuid: str
    result: _struct_pb2.Value
    def __init__(self, uuid: _Optional[str] = ..., result: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ...) -> None: ...

class LogStreamResponse(_message.Message):
    __slots__ = ("uuid", "severity", "message", "source", "driver_type", "operation", "timestamp", "structured_fields")
    class StructuredFieldsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    UUID_FIELD_NUMBER: _ClassVar[int]
    SEVERITY_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    DRIVER_TYPE_FIELD_NUMBER: _ClassVar[int]
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    STRUCTURED_FIELDS_FIELD_NUMBER: _ClassVar[int]
    uuid: str
    severity: str
    message: str
    source: _common_pb2.LogSource
    driver_type: str
    operation: str
    timestamp: _timestamp_pb2.Timestamp
    structured_fields: _containers.ScalarMap[str, str]
    def __init__(self, uuid: _Optional[str] = ..., severity: _Optional[str] = ..., message: _Optional[str] = ..., source: _Optional[_Union[_common_pb2.LogSource, str]] = ..., driver_type: _Optional[str] = ..., operation: _Optional[str] = ..., timestamp: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., structured_fields: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ResetRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResetResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("status", "message", "status_version", "previous_status")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    STATUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_STATUS_FIELD_NUMBER: _ClassVar[int]
    status: _common_pb2.ExporterStatus
    message: str
    status_version: int
    previous_status: _common_pb2.ExporterStatus
    def __init__(self, status: _Optional[_Union[_common_pb2.ExporterStatus, str]] = ..., message: _Optional[str] = ..., status_version: _Optional[int] = ..., previous_status: _Optional[_Union[_common_pb2.ExporterStatus, str]] = ...) -> None: ...

class EndSessionRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class EndSessionResponse(_message.Message):
    __slots__ = ("success", "message")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    success: bool
    message: str
    def __init__(self, success: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...
