"""Domain errors as rich gRPC statuses (google.rpc.Status with ErrorInfo, BadRequest, ResourceInfo)."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from ..domain.errors import TallyError

DOMAIN = "tally.v1"


def rich_status(code: int, reason: str, message: str, violations=(), resource=None) -> grpc.Status:  # noqa: ANN001
    details = []
    info = error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN)
    details.append(info)
    if violations:
        details.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                    for v in violations
                ]
            )
        )
    if resource is not None:
        details.append(error_details_pb2.ResourceInfo(resource_type=resource[0], resource_name=resource[1]))
    packed = []
    for detail in details:
        container = any_pb2.Any()
        container.Pack(detail)
        packed.append(container)
    return rpc_status.to_status(status_pb2.Status(code=code, message=message, details=packed))


def status_of(error: TallyError) -> grpc.Status:
    return rich_status(error.code.value, error.reason, error.message, error.violations, error.resource)


def unavailable_status(request_id: str) -> grpc.Status:
    return rich_status(
        code_pb2.UNAVAILABLE,
        "STORAGE_UNAVAILABLE",
        f"the database is unavailable or busy; retry (ingest with the same idempotency key); request id {request_id}",
    )


def internal_status(request_id: str) -> grpc.Status:
    return rich_status(
        code_pb2.INTERNAL, "INTERNAL", f"internal error; the server logged it under request id {request_id}"
    )
