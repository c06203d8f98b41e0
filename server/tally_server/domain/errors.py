"""Errors the domain raises; the RPC layer maps them to rich gRPC statuses."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Code(enum.Enum):
    """Canonical status codes (the subset the domain uses), by gRPC number."""

    INVALID_ARGUMENT = 3
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    INTERNAL = 13
    UNAVAILABLE = 14
    UNAUTHENTICATED = 16


@dataclass(frozen=True)
class Violation:
    """One invalid field: its path in the request and why."""

    field: str
    description: str


@dataclass
class TallyError(Exception):
    """A refusal with a canonical code and a machine-readable reason.

    `resource` names the resource concerned as (type, name), for ResourceInfo.
    """

    code: Code
    reason: str
    message: str
    violations: list[Violation] = field(default_factory=list)
    resource: tuple[str, str] | None = None
    retry_after_seconds: float | None = None  # said as google.rpc.RetryInfo
    # (subject, description) of each quota refused, said as google.rpc.QuotaFailure.
    quota_violations: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        return self.message

    def listed_violations(self) -> list[Violation]:
        """The violations an answer lists: the first ones that fit in MAX_LISTED_VIOLATIONS
        entries and MAX_LISTED_VIOLATION_BYTES, then one line that counts the rest, so that
        an answer always fits in a response's trailers."""
        sizes = [_encoded_size(v) for v in self.violations]
        if len(sizes) <= MAX_LISTED_VIOLATIONS and sum(sizes) <= MAX_LISTED_VIOLATION_BYTES:
            return self.violations
        listed, size = 0, _SUMMARY_LINE_BYTES
        while listed < MAX_LISTED_VIOLATIONS - 1 and size + sizes[listed] <= MAX_LISTED_VIOLATION_BYTES:
            size += sizes[listed]
            listed += 1
        rest = len(self.violations) - listed
        return [*self.violations[:listed], Violation("", f"and {rest:,} more violations")]


def _encoded_size(violation: Violation) -> int:
    """About the bytes one violation takes in a BadRequest (field tags and lengths included)."""
    return len(violation.field.encode()) + len(violation.description.encode()) + 8


# Enough to fix a request by. gRPC clients refuse trailers over 8 KiB by default (at random
# between 8 and 16 KiB), and an error travels in them twice: the status (message and
# details) in grpc-status-details-bin, the message again, percent-encoded (up to 3 bytes
# for one), in grpc-message. 3 KiB of violations and 600 bytes of message keep to ~6 KiB.
MAX_LISTED_VIOLATIONS = 100
MAX_LISTED_VIOLATION_BYTES = 3072
_SUMMARY_LINE_BYTES = 40
MAX_SUMMARIZED_VIOLATIONS = 5
MAX_SUMMARY_BYTES = 600


class StorageUnavailable(TallyError):
    """The database could not be reached, or was busy beyond its timeout: worth a retry.

    The caller gets a generic message; `detail` (the driver's own words) is only logged.
    """

    def __init__(self, detail: str) -> None:
        super().__init__(
            Code.UNAVAILABLE,
            "STORAGE_UNAVAILABLE",
            "the database is unavailable or busy; retry (an ingest with the same idempotency key)",
            retry_after_seconds=1.0,
        )
        self.detail = detail


def overloaded(what: str) -> TallyError:
    """Load shed: the server is at a limit that keeps its memory bounded; retry shortly."""
    return TallyError(
        Code.RESOURCE_EXHAUSTED,
        "OVERLOADED",
        f"the server is at its limit of {what}; retry shortly",
        retry_after_seconds=1.0,
    )


def internal_error(request_id: str) -> TallyError:
    """What a caller learns of a bug: that it happened, and where the log has it."""
    return TallyError(Code.INTERNAL, "INTERNAL", f"internal error; the server logged it under request id {request_id}")


def invalid(violations: list[Violation], reason: str = "INVALID_ARGUMENT") -> TallyError:
    """One INVALID_ARGUMENT with every violation (its message names the first few)."""
    named: list[str] = []
    for v in violations[:MAX_SUMMARIZED_VIOLATIONS]:
        said = f"{v.field}: {v.description}"
        if named and len("; ".join([*named, said]).encode()) > MAX_SUMMARY_BYTES:
            break
        named.append(said)
    summary = "; ".join(named)
    if len(summary.encode()) > MAX_SUMMARY_BYTES:
        summary = summary.encode()[:MAX_SUMMARY_BYTES].decode(errors="ignore") + "…"
    if len(violations) > len(named):
        summary += f"; and {len(violations) - len(named):,} more"
    return TallyError(Code.INVALID_ARGUMENT, reason, f"invalid request: {summary}", violations)


def not_found(reason: str, resource_type: str, name: str, message: str) -> TallyError:
    return TallyError(Code.NOT_FOUND, reason, message, resource=(resource_type, name))


def already_exists(reason: str, resource_type: str, name: str, message: str) -> TallyError:
    return TallyError(Code.ALREADY_EXISTS, reason, message, resource=(resource_type, name))


def failed_precondition(reason: str, message: str, resource: tuple[str, str] | None = None) -> TallyError:
    return TallyError(Code.FAILED_PRECONDITION, reason, message, resource=resource)


class Violations:
    """Collects field violations so that one error can list all of them."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix
        self.items: list[Violation] = []

    def add(self, field_path: str, description: str) -> None:
        self.items.append(Violation(self.prefix + field_path, description))

    def __bool__(self) -> bool:
        return bool(self.items)

    def raise_if_any(self, reason: str = "INVALID_ARGUMENT") -> None:
        if self.items:
            raise invalid(self.items, reason)
