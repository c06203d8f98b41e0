"""Events read back: listed with filters, or looked up by request id or idempotency key."""

from __future__ import annotations

import uuid

from ..domain import paging
from ..domain.errors import TallyError, Violations, not_found
from ..domain.models import CostState, Page, StoredEvent
from ..domain.validation import check_name, check_text, parse_uuid
from ..storage import events as stored_events, types as stored_types
from ..storage.db import Database


def event_not_found(how: str, value: str) -> TallyError:
    return not_found("EVENT_NOT_FOUND", "tally.v1.StoredEvent", value, f"no event with {how} {value!r}")


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
                found = await stored_events.event_by_id(conn, parsed)
            else:
                found = (await stored_events.events_by_key(conn, [idempotency_key])).get(idempotency_key)
        if found is None:
            raise event_not_found(*(("request id", request_id) if request_id else ("idempotency key", idempotency_key)))
        return found

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
                type_row = await stored_types.get_type(conn, experience_name)
                if type_row is None:
                    return Page([], "")
                type_id = type_row[0]
            event_filter = stored_events.EventFilter(
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
            found = await stored_events.list_events(conn, event_filter, before, size + 1)

        def token_after(count: int) -> str:
            last = found[count - 1].result
            return self.pages.encode("events", filters, [last.event_time_us, str(last.request_id)])

        return Page(found[:size], token_after(size) if len(found) > size else "", token_after)
