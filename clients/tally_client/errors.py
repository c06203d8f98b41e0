"""gRPC errors as Python exceptions that carry Tally's rich status."""

from __future__ import annotations

from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


class TallyError(Exception):
    """A call failed. `code` is the gRPC status, `reason` the ErrorInfo reason
    (e.g. "EXPERIENCE_NOT_FOUND"), `field_violations` maps each bad field to why."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        reason: str = "",
        field_violations: dict[str, str] | None = None,
        resource: tuple[str, str] | None = None,
        request_id: str = "",
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason
        self.field_violations = field_violations or {}
        self.resource = resource
        self.request_id = request_id

    def __str__(self) -> str:
        head = f"{self.code.name}" + (f" ({self.reason})" if self.reason else "")
        return f"{head}: {self.message}"


class NotFound(TallyError):
    pass


class InvalidArgument(TallyError):
    pass


class AlreadyExists(TallyError):
    pass


class FailedPrecondition(TallyError):
    pass


class Unavailable(TallyError):
    pass


class ResourceExhausted(TallyError):
    """Refused for load (reason OVERLOADED) or for a limit (LimitExceeded)."""


class LimitExceeded(ResourceExhausted):
    """A reservation was refused: a BLOCK limit has no room for the estimate (reason
    LIMIT_EXCEEDED). `limits` names them; `retry_after` is the seconds until their period
    starts again (None: a lifetime limit). With enforce_limits, the provider was not called."""

    def __init__(self, *args: Any, limits: tuple[str, ...] = (), retry_after: float | None = None) -> None:
        super().__init__(*args)
        self.limits = limits
        self.retry_after = retry_after


_BY_CODE = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
}


def from_rpc_error(error: grpc.RpcError) -> TallyError:
    """Decodes the google.rpc.Status details of a failed call."""
    # Blocking and asyncio calls raise different classes; both have the grpc.Call methods.
    call: Any = error
    code: grpc.StatusCode = call.code() if hasattr(call, "code") else grpc.StatusCode.UNKNOWN
    message: str = (call.details() if hasattr(call, "details") else str(error)) or code.name
    reason, violations, resource = "", {}, None
    limits: list[str] = []
    retry_after: float | None = None
    try:
        status = rpc_status.from_call(call)
    except ValueError:  # details that disagree with the code or message
        status = None
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations = {v.field: v.description for v in bad.field_violations}
        elif detail.Is(error_details_pb2.ResourceInfo.DESCRIPTOR):
            info = error_details_pb2.ResourceInfo()
            detail.Unpack(info)
            resource = (info.resource_type, info.resource_name)
        elif detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            quota = error_details_pb2.QuotaFailure()
            detail.Unpack(quota)
            limits += [v.subject.removeprefix("limits/") for v in quota.violations]
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_after = retry.retry_delay.ToNanoseconds() / 1e9
    request_id = ""
    trailing = call.trailing_metadata() if hasattr(call, "trailing_metadata") else None
    for key, value in trailing or ():
        if key == "x-request-id":
            request_id = value
    if reason == "LIMIT_EXCEEDED":
        return LimitExceeded(
            code, message, reason, violations, resource, request_id, limits=tuple(limits), retry_after=retry_after
        )
    return _BY_CODE.get(code, TallyError)(code, message, reason, violations, resource, request_id)
