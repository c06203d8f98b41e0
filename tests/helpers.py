"""Assertions on rich gRPC errors."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


@dataclass
class RichError:
    code: grpc.StatusCode | None = None
    message: str = ""
    reason: str = ""
    domain: str = ""
    fields: dict[str, str] = field(default_factory=dict)
    resource: tuple[str, str] | None = None
    details_bytes: int = 0  # the size of the grpc-status-details-bin trailer
    retry_delay_seconds: float | None = None  # google.rpc.RetryInfo


def decode(error: grpc.aio.AioRpcError) -> RichError:
    found = RichError(code=error.code(), message=error.details() or "")
    status = rpc_status.from_call(error)
    found.details_bytes = sum(len(v) for k, v in error.trailing_metadata() or () if k == "grpc-status-details-bin")
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            found.reason, found.domain = info.reason, info.domain
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            found.fields = {v.field: v.description for v in bad.field_violations}
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            found.retry_delay_seconds = retry.retry_delay.ToNanoseconds() / 1e9
        elif detail.Is(error_details_pb2.ResourceInfo.DESCRIPTOR):
            info = error_details_pb2.ResourceInfo()
            detail.Unpack(info)
            found.resource = (info.resource_type, info.resource_name)
    return found


@contextlib.asynccontextmanager
async def raises(code: grpc.StatusCode, reason: str | None = None):
    """Expects the block to fail with `code` (and ErrorInfo `reason`); yields the decoded error."""
    holder = RichError()
    try:
        yield holder
    except grpc.aio.AioRpcError as error:
        decoded = decode(error)
        assert decoded.code == code, f"expected {code}, got {decoded.code}: {decoded.message}"
        if reason is not None:
            assert decoded.reason == reason, f"expected reason {reason}, got {decoded.reason}: {decoded.message}"
        assert decoded.domain == "tally.v1"
        holder.__dict__.update(decoded.__dict__)
    else:
        raise AssertionError(f"expected {code}, but the call succeeded")
