"""Events read back: listed with filters, or looked up by request id or idempotency key."""

from __future__ import annotations

import dataclasses
import json
import uuid
from typing import Any

from ..storage import repository as repo
from ..storage.db import Database
from . import paging
from .errors import TallyError, Violations, not_found
from .ingest import result_from_row
from .models import CostState, EventContext, Page, StoredEvent, UsageEvent
from .validation import check_name, check_text, parse_uuid


def event_not_found(how: str, value: str) -> TallyError:
    return not_found("EVENT_NOT_FOUND", "tally.v1.StoredEvent", value, f"no event with {how} {value!r}")


def stored_event(row: Any) -> StoredEvent:
    """An events row (with its experience's name and version) as the event and its result."""
    result = dataclasses.replace(result_from_row(row), duplicate=False)
    units = row.units if isinstance(row.units, dict) else json.loads(row.units)
    event = UsageEvent(
        category=row.category,
        resource=row.resource,
        units={unit: (int(counts[0]), int(counts[1])) for unit, counts in units.items()},
        event_time_us=row.event_time_us,
        end_to_end_latency_ms=row.end_to_end_latency_ms,
        time_to_first_token_ms=row.time_to_first_token_ms,
        http_status_code=row.http_status_code,
        provider_response_id=row.provider_response_id or "",
        idempotency_key=row.idempotency_key or "",
        properties=dict(row.properties or {}),
        context=EventContext(
            experience_id=str(row.experience_id) if row.experience_id and row.experience_name else "",
            experience_name=row.experience_name or "",
            experience_version=row.experience_version or 0,
            user_id=row.user_id or "",
            request_tags=tuple(row.request_tags or ()),
        ),
        content_hash=row.content_hash,
        price_context=dict(row.price_context or {}),
    )
    return StoredEvent(event, result)


class Events:
    def __init__(self, db: Database, pages: paging.PageTokens | None = None) -> None:
        self.db = db
        self.pages = pages or paging.PageTokens()

    async def get(self, request_id: str = "", idempotency_key: str = "") -> StoredEvent:
        v = Violations()
        if bool(request_id) == bool(idempotency_key):
            v.add("lookup", "set exactly one of request_id and idempotency_key")
        parsed = parse_uuid(request_id) if request_id else None
        if request_id and parsed is None:
            v.add("request_id", f"not a UUID: {request_id[:80]!r}")
        check_text(v, "idempotency_key", idempotency_key, 300)
        v.raise_if_any()
        async with self.db.read() as conn:
            if parsed is not None:
                row = await repo.event_by_id(conn, parsed)
            else:
                row = (await repo.events_by_key(conn, [idempotency_key])).get(idempotency_key)
        if row is None:
            raise event_not_found(*(("request id", request_id) if request_id else ("idempotency key", idempotency_key)))
        return stored_event(row)

    async def list(
        self,
        *,
        experience_id: str = "",
        experience_name: str = "",
        experience_version: int = 0,
        user_id: str = "",
        request_tag: str = "",
        category: str = "",
        resource: str = "",
        cost_state: int = 0,
        start_us: int | None = None,
        end_us: int | None = None,
        page_size: int = 0,
        page_token: str = "",
    ) -> Page:
        v = Violations()
        parsed = parse_uuid(experience_id) if experience_id else None
        if experience_id and parsed is None:
            v.add("experience_id", f"not a UUID: {experience_id[:80]!r}")
        if experience_name:
            check_name(v, "experience_name", experience_name, what="experience type name")
        if experience_version < 0:
            v.add("experience_version", "must be 0 (all versions) or a version number")
        elif experience_version and not experience_name:
            v.add("experience_version", "needs experience_name")
        if cost_state and cost_state not in {int(state) for state in CostState}:
            v.add("cost_state", f"not a cost state: {cost_state}")
        if start_us is not None and end_us is not None and end_us <= start_us:
            v.add("end_time", "must be after start_time")
        for field, value in (
            ("user_id", user_id),
            ("request_tag", request_tag),
            ("category", category),
            ("resource", resource),
        ):
            check_text(v, field, value, 256)
        v.raise_if_any()
        size = paging.page_size(page_size)
        filters = [experience_id, experience_name, experience_version, user_id, request_tag, category, resource]
        filters += [cost_state, start_us, end_us]
        position = self.pages.decode(
            page_token,
            "events",
            filters,
            lambda p: isinstance(p, list) and len(p) == 2 and isinstance(p[0], int) and parse_uuid(p[1]) is not None,
        )
        before = None if position is None else (position[0], uuid.UUID(position[1]))
        async with self.db.read() as conn:
            type_id = None
            if experience_name:
                type_row = await repo.get_type(conn, experience_name)
                if type_row is None:
                    return Page([], "")
                type_id = type_row[0]
            event_filter = repo.EventFilter(
                parsed,
                type_id,
                experience_version,
                user_id,
                request_tag,
                category,
                resource,
                cost_state,
                start_us,
                end_us,
            )
            rows = await repo.list_events(conn, event_filter, before, size + 1)
        token = ""
        if len(rows) > size:
            last = rows[size - 1]
            token = self.pages.encode("events", filters, [last.event_time_us, str(last.id)])
        return Page([stored_event(row) for row in rows[:size]], token)
