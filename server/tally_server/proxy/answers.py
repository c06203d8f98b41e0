"""What the proxy adds to a provider's answer, and the answers it gives itself: the
`xproxy_result` object (the JSON form of tally.v1.XProxyResult), and errors in the shape of
the provider the caller is talking to, so that its SDK raises its usual exception."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from ..domain.errors import TallyError
from ..domain.models import IngestResult
from .upstreams import ANTHROPIC

# The Money of tally.v1 as JSON: a decimal string of dollars, exact to the nano.


def dollars(nanos: int) -> str:
    sign = "-" if nanos < 0 else ""
    whole, fraction = divmod(abs(nanos), 1_000_000_000)
    return f"{sign}{whole}.{fraction:09d}"


def xproxy_result(result: IngestResult) -> dict[str, Any]:
    """The stored event's result, with XProxyResult's field names."""
    cost = result.cost
    answer: dict[str, Any] = {
        "request_id": str(result.request_id),
        "experience_id": str(result.experience_id) if result.experience_id else "",
        "experience_name": result.experience_name,
        "experience_version": result.experience_version,
        "experience_created": result.experience_created,
        "cost_input": {"currency_code": "USD", "amount": dollars(cost.input_nanos)},
        "cost_output": {"currency_code": "USD", "amount": dollars(cost.output_nanos)},
        "cost_total": {"currency_code": "USD", "amount": dollars(cost.total_nanos)},
        "cost_state": f"COST_STATE_{cost.state.name}",
        "user_id": result.user_id,
        "request_tags": list(result.request_tags),
        "duplicate_request": result.duplicate,
        "warnings": list(result.warnings),
        "unknown_units": [
            {"unit_type": u.unit_type, "input": u.input, "output": u.output, "reason": u.reason}
            for u in cost.unknown_units
        ],
        "limits": [
            {
                "limit": applied.limit.name,
                "state": f"LIMIT_STATE_{applied.state.name}",
                "crossed": applied.crossed,
                "spend": {"currency_code": "USD", "amount": dollars(applied.spend_nanos)},
                "max": {"currency_code": "USD", "amount": dollars(applied.limit.max_nanos)},
                "experience_id": applied.subject,
            }
            for applied in result.limits
        ],
    }
    if cost.price is not None:
        answer["price"] = {
            "source": f"PRICE_SOURCE_{cost.price.source.name}",
            "category": cost.price.category,
            "resource": cost.price.resource,
            "version": cost.price.version,
        }
    return answer


def not_recorded(warnings: Sequence[str], experience_id: str, request_id: str) -> dict[str, Any]:
    """The result of a call whose event could not be stored."""
    return {
        "request_id": request_id,
        "experience_id": experience_id,
        "recorded": False,
        "cost_state": "COST_STATE_UNSPECIFIED",
        "warnings": list(warnings),
    }


def encode(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def inject(body: bytes, result: dict[str, Any]) -> bytes | None:
    """`body` (a JSON object, maybe the data of an event) with `"xproxy_result": ...` added
    as its last member, every byte before it as it was; None when it does not end an object."""
    end = body.rstrip().rfind(b"}")
    if end < 0:
        return None
    before = body[:end].rstrip()
    comma = b"" if before.endswith(b"{") else b","
    return before + comma + b'"xproxy_result":' + encode(result) + body[end:]


# --- the proxy's own answers, in the provider's error shape -----------------------------------

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    421: "invalid_request_error",
    429: "rate_limit_error",
    502: "api_error",
    503: "overloaded_error",
    504: "api_error",
}


def error(
    shape: str,
    status: int,
    message: str,
    *,
    code: str = "",
    result: dict[str, Any] | None = None,
    retry_after: float | None = None,
    extra: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """An error answer as the provider would give it (OpenAI: {"error": {...}}; Anthropic:
    {"type": "error", "error": {...}}), the message saying it came from Tally."""
    kind = _TYPES.get(status, "api_error")
    details: dict[str, Any] = {"message": f"Tally proxy: {message}", "type": kind}
    if shape == ANTHROPIC:
        body: dict[str, Any] = {"type": "error", "error": details}
    else:
        details.update(param=None, code=code or None)
        body = {"error": details}
    if extra:
        body.update(extra)
    if result is not None:
        body["xproxy_result"] = result
    answer_headers = {"Content-Type": "application/json", **(headers or {})}
    if retry_after is not None:
        answer_headers["Retry-After"] = str(max(1, round(retry_after)))
    return web.Response(status=status, body=encode(body), headers=answer_headers)


def from_tally_error(shape: str, refusal: TallyError, warnings: Sequence[str] = ()) -> web.Response:
    """A refusal of Tally's (a bad xproxy header, a key, a limit) as the provider's error."""
    status = {
        "INVALID_ARGUMENT": 400,
        "UNAUTHENTICATED": 401,
        "PERMISSION_DENIED": 403,
        "NOT_FOUND": 404,
        "FAILED_PRECONDITION": 400,
        "RESOURCE_EXHAUSTED": 429,
        "UNAVAILABLE": 503,
    }.get(refusal.code.name, 400)
    message = refusal.message
    if refusal.violations:
        message += ": " + "; ".join(f"{v.field}: {v.description}" for v in refusal.listed_violations())
    result: dict[str, Any] | None = None
    headers: dict[str, str] = {}
    if refusal.reason == "LIMIT_EXCEEDED":
        # The SDKs retry a 429 at once by default; a limit has no room until its period ends.
        headers["x-should-retry"] = "false"
        result = {
            "recorded": False,
            "limits": [
                {"limit": subject.removeprefix("limits/"), "state": "LIMIT_STATE_EXCEEDED", "description": description}
                for subject, description in refusal.quota_violations
            ],
            "warnings": list(warnings),
        }
    return error(
        shape,
        status,
        message,
        code=refusal.reason.lower(),
        result=result,
        retry_after=refusal.retry_after_seconds if status == 429 else None,
        headers=headers,
    )
