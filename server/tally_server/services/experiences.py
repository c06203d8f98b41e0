"""Experiences: explicit creation, reads with statistics, listing, properties, deletion."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Sequence

from sqlalchemy.ext.asyncio import AsyncConnection

from ..domain import outcomes, paging, stats
from ..domain.errors import Violations, already_exists
from ..domain.models import Experience, ExperienceStats, Page, PropertyUpdate, StepCost, now_us
from ..domain.resolution import experience_not_found, new_experience_id
from ..domain.rollups import rescored, verdicts_of
from ..domain.validation import PROPERTIES_MAX_ENTRIES, check_name, check_request_id, check_string_map, parse_uuid
from ..storage import (
    events as stored_events,
    experiences as stored_experiences,
    idempotency as stored_idempotency,
    outcomes as stored_outcomes,
    rollups as stored_rollups,
    steps as stored_steps,
    types as stored_types,
)
from ..storage.db import Database
from .experience_types import fingerprint, request_id_reused, type_not_found


def _require_uuid(v: Violations, field_path: str, text: str) -> uuid.UUID | None:
    if not text:
        v.add(field_path, "experience_id is required")
        return None
    parsed = parse_uuid(text)
    if parsed is None:
        v.add(field_path, f"not a UUID: {text[:80]!r}")
    return parsed


def _experience_id(text: str) -> uuid.UUID:
    """The experience id of a request; INVALID_ARGUMENT when missing or not a UUID."""
    v = Violations()
    parsed = _require_uuid(v, "experience_id", text)
    v.raise_if_any()
    assert parsed is not None  # raise_if_any refused a missing or bad id
    return parsed


ORDER_FIELDS = ("create_time", "cost_total", "event_count")


def parse_order_by(v: Violations, order_by: str) -> tuple[str, bool]:
    """An AIP-132 order_by of one field: "create_time" (ascending) or "cost_total desc".
    Empty means "create_time desc", newest first."""
    words = order_by.split()
    if not words:
        return "create_time", True
    if len(words) <= 2 and words[0] in ORDER_FIELDS and words[1:] in ([], ["asc"], ["desc"]):
        return words[0], words[1:] == ["desc"]
    v.add("order_by", f"must be one of {', '.join(ORDER_FIELDS)}, optionally followed by desc; got {order_by[:80]!r}")
    return "create_time", True


class Experiences:
    def __init__(self, db: Database, pages: paging.PageTokens | None = None) -> None:
        self.db = db
        self.pages = pages or paging.PageTokens()

    async def create(
        self,
        experience_name: str,
        experience_id: str = "",
        version: int = 0,
        properties: dict[str, str] | None = None,
        request_id: str = "",
        key_name: str = "",
    ) -> Experience:
        properties = dict(properties or {})
        v = Violations()
        check_name(v, "experience_name", experience_name, what="experience type name")
        own_id = _require_uuid(v, "experience_id", experience_id) if experience_id else None
        if version < 0:
            v.add("experience_version", "must be 0 (current) or a version number")
        check_string_map(v, "properties", properties, PROPERTIES_MAX_ENTRIES)
        check_request_id(v, "request_id", request_id)
        v.raise_if_any()

        request_fingerprint = fingerprint(experience_name, experience_id, version, properties)
        now = now_us()
        async with self.db.write() as conn:
            if request_id:
                seen = await stored_idempotency.get_idempotent_request(conn, "CreateExperience", request_id)
                if seen is not None:
                    if seen[0] != request_fingerprint:
                        raise request_id_reused(request_id)
                    found = await stored_experiences.get_experience(conn, uuid.UUID(seen[1]))
                    if found is None:
                        raise experience_not_found(seen[1])
                    updates = await stored_experiences.property_updates(conn, found.experience_id)
                    return dataclasses.replace(found, property_updates=updates)
            type_row = await stored_types.get_type(conn, experience_name)
            if type_row is None:
                raise type_not_found(experience_name)
            type_id, experience_type = type_row
            if version > experience_type.version:
                v.add(
                    "experience_version",
                    f"version {version} of {experience_name!r} does not exist (current: {experience_type.version})",
                )
                v.raise_if_any()
            new_id = own_id or new_experience_id()
            experience = Experience(
                new_id,
                experience_name,
                version or experience_type.version,
                now,
                properties,
                property_updates=tuple(PropertyUpdate(key, now, key_name) for key in sorted(properties)),
            )
            row = {
                "id": new_id,
                "type_id": type_id,
                "version": experience.experience_version,
                "create_time_us": now,
                "properties": properties,
            }
            if not await stored_experiences.insert_experiences(conn, [row]):
                raise already_exists(
                    "EXPERIENCE_ALREADY_EXISTS",
                    "tally.v1.Experience",
                    str(new_id),
                    f"experience {new_id} already exists",
                )
            await stored_experiences.note_property_updates(conn, new_id, properties, (), now, key_name)
            if request_id:
                await stored_idempotency.put_idempotent_request(
                    conn, "CreateExperience", request_id, request_fingerprint, str(new_id), now
                )
        return experience

    async def ranked(self, experience_ids: Sequence[uuid.UUID], order: str, limit: int) -> list[Experience]:
        """The first `limit` of these experiences by `order` (create_time, cost_total or
        event_count), most first, with their statistics but for the latency percentiles
        (left unknown: not read), in one read."""
        async with self.db.read() as conn:
            found = await stored_experiences.experiences_with_rollups(
                conn, experience_ids, latencies=False, ranked=(order, limit)
            )
        return [dataclasses.replace(e, stats=stats.experience_stats(rollup)) for e, rollup in found]

    async def first_users(self, experience_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, str]:
        """The user id of each experience's first event ("" for none)."""
        async with self.db.read() as conn:
            return await stored_events.first_users(conn, experience_ids)

    async def get(self, experience_id: str) -> tuple[Experience, ExperienceStats]:
        parsed = _experience_id(experience_id)
        async with self.db.read() as conn:
            found = await stored_experiences.experience_with_rollup(conn, parsed)
            if found is None:
                raise experience_not_found(parsed)
            experience, rollup = found
            recorded = (await stored_outcomes.latest(conn, [parsed])).get(parsed, [])
            declared = await self._declared(conn, experience.experience_name) if recorded else {}
            steps = tuple(StepCost(*step) for step in await stored_steps.of_experience(conn, parsed))
            updates = await stored_experiences.property_updates(conn, parsed)
        experience = dataclasses.replace(
            experience, outcomes=outcomes.scored(recorded, declared), step_costs=steps, property_updates=updates
        )
        return experience, stats.experience_stats(rollup)

    async def _declared(self, conn: AsyncConnection, type_name: str) -> dict[str, outcomes.OutcomeDefinition]:
        found = await stored_types.get_type(conn, type_name)
        return {d.name: d for d in found[1].outcomes} if found else {}

    async def outcome_changes(self, experience_id: str, page_size: int, page_token: str) -> Page:
        """A page of the run's outcome changes (ScoredOutcome, without verdicts), the oldest first."""
        parsed = _experience_id(experience_id)
        size = paging.page_size(page_size)
        after = self.pages.decode(page_token, "outcome_changes", str(parsed), lambda p: isinstance(p, int))
        async with self.db.read() as conn:
            experience = await stored_experiences.get_experience(conn, parsed)
            if experience is None:
                raise experience_not_found(parsed)
            declared = await self._declared(conn, experience.experience_name)
            found = await stored_outcomes.changes(conn, parsed, after, size + 1)
        token = self.pages.encode("outcome_changes", str(parsed), found[size - 1][0]) if len(found) > size else ""
        items = [outcomes.ScoredOutcome(change, declared.get(change.name), None) for _, change in found[:size]]
        return Page(items, token)

    async def check_outcomes(
        self, experience_id: str, experience_name: str, values: Sequence[outcomes.OutcomeValue], field: str
    ) -> None:
        """Refuses, before a call that carries them, values its run could not record: the run
        is the experience if it exists, else a new one of the type named."""
        v = Violations()
        parsed = parse_uuid(experience_id) if experience_id else None
        async with self.db.read() as conn:
            experience = await stored_experiences.get_experience(conn, parsed) if parsed else None
            name = experience.experience_name if experience else experience_name
            if not name:
                v.add(field, "outcomes need the run: name its experience (id, or type for a new one)")
                v.raise_if_any()
            declared = await self._declared(conn, name)
        outcomes.check_values(v, field, declared, values)
        v.raise_if_any()

    async def record_outcomes(
        self, experience_id: str, values: Sequence[outcomes.OutcomeValue], key_name: str
    ) -> tuple[outcomes.ScoredOutcome, ...]:
        """Sets outcome values of a run, each checked against its type's declarations; all
        or nothing. Returns the run's outcomes after the call."""
        parsed = _experience_id(experience_id)
        async with self.db.write() as conn:
            experience = await stored_experiences.get_experience(conn, parsed)
            if experience is None:
                raise experience_not_found(parsed)
            declared = await self._declared(conn, experience.experience_name)
            v = Violations()
            outcomes.check_values(v, "values", declared, values)
            v.raise_if_any()
            # The run locked, as the writer locks it: its outcome rollups move in turn.
            states = await stored_experiences.experience_states(conn, [parsed])
            before = {o.name: o.value for o in (await stored_outcomes.latest(conn, [parsed])).get(parsed, [])}
            await stored_outcomes.record(conn, parsed, values, now_us(), key_name, before)
            if parsed in states:  # (deleted meanwhile: nothing counts it)
                after = {**before, **{value.name: value.value for value in values}}
                definitions = tuple(declared.values())
                counted = dataclasses.replace(states[parsed], verdicts=verdicts_of(before, definitions))
                await stored_rollups.add_type_deltas(conn, rescored(counted, verdicts_of(after, definitions)))
            recorded = (await stored_outcomes.latest(conn, [parsed])).get(parsed, [])
        return outcomes.scored(recorded, declared)

    async def list(
        self,
        experience_name: str,
        version: int,
        start_us: int | None,
        end_us: int | None,
        page_size: int,
        page_token: str,
        order_by: str = "",
    ) -> Page:
        """A page of experiences with their statistics, in the order asked (AIP-132)."""
        v = Violations()
        check_name(v, "experience_name", experience_name, what="experience type name")
        if version < 0:
            v.add("experience_version", "must be 0 (all versions) or a version number")
        if start_us is not None and end_us is not None and end_us <= start_us:
            v.add("create_time_end", "must be after create_time_start")
        order, descending = parse_order_by(v, order_by)
        v.raise_if_any()
        size = paging.page_size(page_size)
        filters = [experience_name, version, start_us, end_us, order, descending]
        width = len(stored_experiences.EXPERIENCE_ORDERS[order]) + 1
        after = self.pages.decode(
            page_token,
            "experiences",
            filters,
            lambda p: (
                isinstance(p, list)
                and len(p) == width
                and all(isinstance(x, int) and not isinstance(x, bool) for x in p[:-1])
                and isinstance(p[-1], str)
                and parse_uuid(p[-1]) is not None
            ),
        )
        async with self.db.read() as conn:
            type_row = await stored_types.get_type(conn, experience_name)
            if type_row is None:
                raise type_not_found(experience_name)
            rows = await stored_experiences.list_experiences(
                conn, type_row[0], version, start_us, end_us, order, descending, after, size + 1
            )
        token = self.pages.encode("experiences", filters, rows[size - 1][2]) if len(rows) > size else ""
        items = [
            dataclasses.replace(experience, stats=stats.experience_stats(rollup))
            for experience, rollup, _ in rows[:size]
        ]
        return Page(items, token)

    async def delete(self, experience_id: str) -> int:
        parsed = _experience_id(experience_id)
        async with self.db.write() as conn:
            unattributed = await stored_experiences.delete_experience(conn, parsed)
        if unattributed is None:
            raise experience_not_found(parsed)
        return unattributed

    async def update_properties(
        self, experience_id: str, set_properties: dict[str, str], remove_keys: Sequence[str], key_name: str = ""
    ) -> Experience:
        v = Violations()
        parsed = _require_uuid(v, "experience_id", experience_id)
        check_string_map(v, "set_properties", set_properties, PROPERTIES_MAX_ENTRIES)
        for key in set(remove_keys) & set(set_properties):
            v.add("remove_keys", f"{key!r} is both set and removed")
        v.raise_if_any()
        assert parsed is not None  # raise_if_any refused a missing or bad id
        async with self.db.write() as conn:
            experience = await stored_experiences.get_experience(conn, parsed)
            if experience is None:
                raise experience_not_found(parsed)
            properties = {k: val for k, val in experience.properties.items() if k not in set(remove_keys)}
            properties.update(set_properties)
            if len(properties) > PROPERTIES_MAX_ENTRIES:
                v.add("set_properties", f"an experience has at most {PROPERTIES_MAX_ENTRIES} properties")
                v.raise_if_any()
            await stored_experiences.set_properties(conn, parsed, properties)
            await stored_experiences.note_property_updates(
                conn, parsed, set_properties, set(remove_keys) - set(set_properties), now_us(), key_name
            )
            updates = await stored_experiences.property_updates(conn, parsed)
        return Experience(
            experience.experience_id,
            experience.experience_name,
            experience.experience_version,
            experience.create_time_us,
            properties,
            property_updates=updates,
        )
