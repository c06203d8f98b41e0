"""How an exception becomes what a caller sees: the one place that decides it.

A TallyError (StorageUnavailable included) is the caller's answer as it is; anything
else is a bug, logged with its stack trace under the request id and answered as
INTERNAL with a generic message. The result becomes a rich status for a call
(google.rpc.Status with ErrorInfo, BadRequest, ResourceInfo), or an item error in a
batch or stream.
"""

from __future__ import annotations

import contextvars
import logging

import grpc
from google.protobuf import any_pb2, message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from ..domain.errors import StorageUnavailable, TallyError, internal_error
from ..logs import RepeatedLog

log = logging.getLogger("tally.rpc")
repeated = RepeatedLog(log)
DOMAIN = "tally.v1"

# (method, request id) of the call being served, set by the interceptor, so that an
# event's error in a batch or stream is logged under its call like the call's own.
current_call: contextvars.ContextVar[tuple[str, str]] = contextvars.ContextVar("tally_call", default=("", ""))


def as_tally_error(error: BaseException, method: str, request_id: str) -> TallyError:
    """The error a caller gets for `error`, logged as it deserves."""
    if isinstance(error, StorageUnavailable):
        # Said once per interval with a count: an outage fails every call alike, and each call's
        # own line (the interceptor's, with its request id) says which ones.
        repeated.warning("storage unavailable method=%s: %s", method, error.detail)
        return error
    if isinstance(error, TallyError):
        return error
    log.error("unhandled error method=%s request_id=%s", method, request_id, exc_info=error)
    return internal_error(request_id)


def status_of(error: TallyError) -> grpc.Status:
    details: list[message.Message] = [error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN)]
    if error.violations:
        details.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                    for v in error.listed_violations()
                ]
            )
        )
    if error.quota_violations:
        details.append(
            error_details_pb2.QuotaFailure(
                violations=[
                    error_details_pb2.QuotaFailure.Violation(subject=subject, description=description)
                    for subject, description in error.quota_violations[:20]
                ]
            )
        )
    if error.retry_after_seconds is not None:
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromNanoseconds(int(error.retry_after_seconds * 1e9))
        details.append(retry)
    if error.resource is not None:
        resource_type, resource_name = error.resource
        details.append(error_details_pb2.ResourceInfo(resource_type=resource_type, resource_name=resource_name))
    packed = []
    for detail in details:
        container = any_pb2.Any()
        container.Pack(detail)
        packed.append(container)
    return rpc_status.to_status(status_pb2.Status(code=error.code.value, message=error.message, details=packed))
