"""Experience types: create, read, update, version, delete, statistics."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from ..domain import outcomes, paging
from ..domain.errors import Code, TallyError, Violations, already_exists, failed_precondition, not_found
from ..domain.models import ExperienceType, ExperienceTypeVersion, Page, StepCost, TypeStats, now_us
from ..domain.validation import (
    SETTINGS_MAX_ENTRIES,
    check_description,
    check_name,
    check_request_id,
    check_string_map,
)
from ..storage import (
    idempotency as stored_idempotency,
    rollups as stored_rollups,
    types as stored_types,
)
from ..storage.db import Database
from .type_stats import summaries, type_stats, unbounded_if_whole, window_sums


def _verdict_rules(definitions: Sequence[outcomes.OutcomeDefinition]) -> set[tuple[Any, ...]]:
    return {(d.name, d.kind, d.goal) for d in definitions}


UPDATABLE_FIELDS = ("description", "settings", "outcomes")
DEFAULT_UPDATE = ("description", "settings")  # an empty update_mask, as before outcomes


def type_not_found(name: str) -> TallyError:
    return not_found(
        "EXPERIENCE_TYPE_NOT_FOUND",
        "tally.v1.ExperienceType",
        name,
        f"experience type {name!r} does not exist; create it with ExperienceTypeService.CreateExperienceType",
    )


def fingerprint(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def request_id_reused(request_id: str) -> TallyError:
    return TallyError(
        Code.ALREADY_EXISTS,
        "REQUEST_ID_REUSED",
        f"request_id {request_id!r} was already used for a different request",
    )


class ExperienceTypes:
    def __init__(self, db: Database, pages: paging.PageTokens | None = None) -> None:
        self.db = db
        self.pages = pages or paging.PageTokens()

    async def create(
        self,
        name: str,
        description: str,
        settings: dict[str, str],
        request_id: str = "",
        outcome_definitions: Sequence[outcomes.OutcomeDefinition] = (),
    ) -> ExperienceType:
        v = Violations()
        check_name(v, "experience_type.name", name)
        check_description(v, "experience_type.description", description)
        check_string_map(v, "experience_type.settings", settings, SETTINGS_MAX_ENTRIES)
        outcomes.check_definitions(v, "experience_type.outcomes", outcome_definitions)
        check_request_id(v, "request_id", request_id)
        v.raise_if_any()

        declared = tuple(outcome_definitions)
        request_fingerprint = fingerprint(
            name, description, settings, *([outcomes.to_json(declared)] if declared else [])
        )
        now = now_us()
        async with self.db.write() as conn:
            if request_id:
                seen = await stored_idempotency.get_idempotent_request(conn, "CreateExperienceType", request_id)
                if seen is not None:
                    if seen[0] != request_fingerprint:
                        raise request_id_reused(request_id)
                    found = await stored_types.get_type(conn, seen[1])
                    if found is None:
                        raise type_not_found(seen[1])
                    return found[1]
            created = ExperienceType(name, description, dict(settings), 1, now, now, declared)
            if await stored_types.insert_type(conn, created) is None:
                raise already_exists(
                    "EXPERIENCE_TYPE_ALREADY_EXISTS",
                    "tally.v1.ExperienceType",
                    name,
                    f"experience type {name!r} already exists",
                )
            if request_id:
                await stored_idempotency.put_idempotent_request(
                    conn, "CreateExperienceType", request_id, request_fingerprint, name, now
                )
        return created

    async def _require(self, conn: AsyncConnection, name: str) -> tuple[int, ExperienceType]:
        v = Violations()
        check_name(v, "name", name)
        v.raise_if_any()
        found = await stored_types.get_type(conn, name)
        if found is None:
            raise type_not_found(name)
        return found

    async def get(self, name: str) -> ExperienceType:
        async with self.db.read() as conn:
            return (await self._require(conn, name))[1]

    async def list(self, page_size: int, page_token: str) -> Page:
        size = paging.page_size(page_size)
        after = self.pages.decode(page_token, "experience_types", None, lambda p: isinstance(p, str))
        async with self.db.read() as conn:
            items = await stored_types.list_types(conn, after, size + 1)
        token = self.pages.encode("experience_types", None, items[size - 1].name) if len(items) > size else ""
        return Page(items[:size], token)

    async def update(
        self,
        name: str,
        description: str,
        settings: dict[str, str],
        update_mask: Sequence[str],
        outcome_definitions: Sequence[outcomes.OutcomeDefinition] = (),
    ) -> ExperienceType:
        paths = list(update_mask) or list(DEFAULT_UPDATE)
        v = Violations()
        check_name(v, "experience_type.name", name)
        for path in paths:
            if path not in UPDATABLE_FIELDS:
                v.add("update_mask", f"{path!r} cannot be updated; updatable fields: description, settings, outcomes")
        if "description" in paths:
            check_description(v, "experience_type.description", description)
        if "settings" in paths:
            check_string_map(v, "experience_type.settings", settings, SETTINGS_MAX_ENTRIES)
        if "outcomes" in paths:
            outcomes.check_definitions(v, "experience_type.outcomes", outcome_definitions)
        v.raise_if_any()

        values: dict[str, Any] = {}
        if "description" in paths:
            values["description"] = description
        if "settings" in paths:
            values["settings"] = dict(settings)
        if "outcomes" in paths:
            values["outcomes"] = tuple(outcome_definitions)
        async with self.db.write() as conn:
            type_id, current = await self._require(conn, name)
            # New goals (or outcomes gone) change the verdicts the type's runs are counted by.
            recount = "outcomes" in paths and _verdict_rules(current.outcomes) != _verdict_rules(outcome_definitions)
            if recount:
                await stored_types.lock_type(conn, type_id)
            await stored_types.update_type(conn, type_id, current.version, values, now_us())
            if recount:
                await stored_rollups.recount_outcomes(conn, type_id)
            return (await self._require(conn, name))[1]

    async def delete(self, name: str, force: bool) -> int:
        async with self.db.write() as conn:
            type_id, _ = await self._require(conn, name)
            await stored_types.lock_type(conn, type_id)
            count = await stored_types.count_experiences_of_type(conn, type_id)
            if count and not force:
                raise failed_precondition(
                    "EXPERIENCE_TYPE_IN_USE",
                    f"experience type {name!r} has {count} experience(s); delete them first or pass force=true",
                    resource=("tally.v1.ExperienceType", name),
                )
            return await stored_types.delete_type(conn, type_id)

    async def increment_version(self, name: str, request_id: str = "") -> tuple[ExperienceType, ExperienceTypeVersion]:
        v = Violations()
        check_request_id(v, "request_id", request_id)
        v.raise_if_any()
        async with self.db.write() as conn:
            type_id, current = await self._require(conn, name)
            if request_id:
                seen = await stored_idempotency.get_idempotent_request(
                    conn, "IncrementExperienceTypeVersion", request_id
                )
                if seen is not None:
                    if seen[0] != fingerprint(name):
                        raise request_id_reused(request_id)
                    snapshot = await stored_types.get_version(conn, type_id, name, int(seen[1]))
                    return current, snapshot
            now = now_us()
            version = await stored_types.increment_version(conn, type_id, now)
            await stored_types.insert_type_version(conn, type_id, version, current.description, current.settings, now)
            if request_id:
                await stored_idempotency.put_idempotent_request(
                    conn, "IncrementExperienceTypeVersion", request_id, fingerprint(name), str(version), now
                )
            updated = (await self._require(conn, name))[1]
            return updated, await stored_types.get_version(conn, type_id, name, version)

    async def list_versions(self, name: str, page_size: int, page_token: str) -> Page:
        size = paging.page_size(page_size)
        before = self.pages.decode(page_token, "experience_type_versions", name, lambda p: isinstance(p, int))
        async with self.db.read() as conn:
            type_id, _ = await self._require(conn, name)
            items = await stored_types.list_versions(conn, type_id, name, before, size + 1)
        token = ""
        if len(items) > size:
            token = self.pages.encode("experience_type_versions", name, items[size - 1].version)
        return Page(items[:size], token)

    async def stats(
        self,
        name: str,
        version: int,
        start_us: int | None,
        end_us: int | None,
        include_outcomes: bool = False,
        versions_only: bool = False,
    ) -> TypeStats:
        """The type's cost distribution, in total and per version, over the runs whose first
        event is in the window, with its steps and, if asked, its outcomes. `versions_only`
        (the dashboard's versions side by side): no total of several versions, and of the
        outcomes their rates and costs, not the percentiles of their runs' costs (each
        percentile is a walk of the cost index, and these are most of a read's time)."""
        v = Violations()
        if version < 0:
            v.add("version", "must be 0 (all versions) or a version number")
        if start_us is not None and end_us is not None and end_us <= start_us:
            v.add("end_time", "must be after start_time")
        v.raise_if_any()
        async with self.db.read() as conn:
            type_id, experience_type = await self._require(conn, name)
            start_us, end_us = await unbounded_if_whole(conn, type_id, version, start_us, end_us)
            sums = await window_sums(conn, type_id, version, start_us, end_us)
            found = await type_stats(conn, name, type_id, version, start_us, end_us, sums, not versions_only)
            scored = {}
            if include_outcomes and experience_type.outcomes:
                summarized = await summaries(
                    conn, type_id, start_us, end_us, sums, experience_type.outcomes, found.by_version, not versions_only
                )
                scored = {v: summary.outcomes for v, summary in summarized.items()}
        steps = [
            StepCost(step, st.event_count, st.cost_total_nanos, v, st.run_count, of_version.totals.experience_count)
            for v, of_version in sorted(sums.items())
            for step, st in sorted(of_version.steps.items())
            if st.run_count
        ]
        return dataclasses.replace(found, outcomes=scored, steps=tuple(steps))
