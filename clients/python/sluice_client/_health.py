"""grpc.health.v1 Check messages without grpcio-health-checking.

The two messages are declared here from the standard ``health.proto`` definition and built
by protobuf itself in a private descriptor pool (so they never clash with grpc_health's
copy in the default pool when both are imported). The client needs only grpcio, protobuf
and numpy.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

CHECK_METHOD = "/grpc.health.v1.Health/Check"
_PACKAGE = "grpc.health.v1"
_STATUSES = ("UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN")


def _health_file() -> Any:
    field = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(
        name="sluice_client/grpc_health_v1.proto", package=_PACKAGE, syntax="proto3"
    )
    request = proto.message_type.add(name="HealthCheckRequest")
    request.field.add(name="service", number=1, type=field.TYPE_STRING, label=field.LABEL_OPTIONAL)
    response = proto.message_type.add(name="HealthCheckResponse")
    statuses = response.enum_type.add(name="ServingStatus")
    for number, name in enumerate(_STATUSES):
        statuses.value.add(name=name, number=number)
    response.field.add(
        name="status",
        number=1,
        type=field.TYPE_ENUM,
        label=field.LABEL_OPTIONAL,
        type_name=f".{_PACKAGE}.HealthCheckResponse.ServingStatus",
    )
    return proto


def _message_classes() -> tuple[Any, Any]:
    pool = descriptor_pool.DescriptorPool()
    pool.Add(_health_file())
    request, response = (
        message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.{name}"))
        for name in ("HealthCheckRequest", "HealthCheckResponse")
    )
    return request, response


HealthCheckRequest, HealthCheckResponse = _message_classes()


def status_name(response: Any) -> str:
    """The ServingStatus name of a HealthCheckResponse ("SERVING", "NOT_SERVING", ...)."""
    number = int(response.status)
    return _STATUSES[number] if number < len(_STATUSES) else str(number)
