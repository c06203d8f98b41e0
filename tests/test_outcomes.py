"""Outcomes through the wire, on both engines: a type declares what its runs are scored on,
a run is scored (RecordOutcomes) at any time after its events, a later value replaces an
earlier one and every change is kept, and bad declarations or values change nothing."""

from __future__ import annotations

import uuid

import pytest
import sqlalchemy as sa

from tally_client import AsyncTallyClient, InvalidArgument, NotFound, outcome
from tally_server.storage.tables import experience_outcome_changes

from .conftest import unique

OUTCOMES = [
    outcome("resolved", "boolean", equals=True, description="the user's question was answered"),
    outcome("csat", "likert_5", at_least=4),
    outcome("accuracy", "percentage", at_least=90),
    outcome("turns", "number", at_most=5),
    outcome("escalated", "boolean"),
    outcome("length", "number"),
]


async def changes(server, experience_id: str) -> int:
    async with server.db.read() as conn:
        counted = await conn.execute(
            sa.select(sa.func.count())
            .select_from(experience_outcome_changes)
            .where(experience_outcome_changes.c.experience_id == uuid.UUID(experience_id))
        )
        return int(counted.scalar_one())


def as_dict(recorded) -> dict[str, tuple[object, bool | None]]:
    found = {}
    for o in recorded:
        value = o.value.bool_value if o.value.WhichOneof("value") == "bool_value" else o.value.number_value
        found[o.value.name] = (value, o.succeeded if o.HasField("succeeded") else None)
    return found


async def test_a_type_declares_outcomes_and_a_run_is_scored_then_rescored(stubs):
    name = unique("Scored")
    async with AsyncTallyClient(stubs.target) as tally:
        created = await tally.create_experience_type(name, "Answer a support question", outcomes=OUTCOMES)
        assert [o.name for o in created.outcomes] == [o.name for o in OUTCOMES]
        assert created.outcomes[1].goal.at_least == 4 and created.outcomes[0].goal.equals is True
        run = await tally.create_experience(name)
        recorded = await tally.record_outcomes(
            run.experience_id, {"resolved": True, "csat": 3, "accuracy": 92.5, "turns": 7, "escalated": False}
        )
        assert as_dict(recorded) == {
            "accuracy": (92.5, True),
            "csat": (3.0, False),
            "escalated": (False, False),  # a BOOLEAN without a goal: true is success
            "resolved": (True, True),
            "turns": (7.0, False),
        }
        assert await changes(stubs.server, run.experience_id) == 5
        # A later value replaces the earlier one; the same value again changes nothing.
        again = await tally.record_outcomes(run.experience_id, {"csat": 5, "resolved": True, "length": 1234})
        assert as_dict(again)["csat"] == (5.0, True) and as_dict(again)["length"] == (1234.0, None)
        assert await changes(stubs.server, run.experience_id) == 7, "csat and length changed; resolved did not"
        got = (await tally.get_experience(run.experience_id)).outcomes
        assert as_dict(got) == as_dict(again)
        assert all(o.key_name == "" and o.record_time.seconds > 0 for o in got)  # keys are off here

        # Outcomes are replaced as a whole by update_mask "outcomes"; the version does not move.
        updated = await tally.update_experience_type(name, outcomes=[outcome("csat", "likert_5", at_least=3)])
        assert [o.name for o in updated.outcomes] == ["csat"] and updated.version == 1
        described = await tally.update_experience_type(name, description="Answer one question")
        assert [o.name for o in described.outcomes] == ["csat"], "an update without outcomes keeps them"
        rescored = as_dict((await tally.get_experience(run.experience_id)).outcomes)
        assert rescored["csat"] == (5.0, True)
        assert rescored["turns"] == (7.0, None), "no longer declared: kept, without a verdict"


async def test_the_client_records_a_runs_outcomes_as_its_block_ends(stubs):
    name = unique("Block")
    async with AsyncTallyClient(stubs.target) as tally:
        await tally.create_experience_type(name, "Runs scored at their end", outcomes=OUTCOMES[:2])
        async with tally.experience(name) as run:
            await tally.ingest("system.openai", "gpt-4o", {"text": (100, 10)})
            run.outcome("resolved", False)
            run.outcome("resolved", True)  # a later value replaces it before it is sent
            run.outcome("csat", 4)
        got = as_dict((await tally.get_experience(run.experience_id)).outcomes)
        assert got == {"resolved": (True, True), "csat": (4.0, True)}
        block = tally.experience(name)
        plain = block.__enter__()  # a plain `with` on the async client, step by step
        await tally.ingest("system.openai", "gpt-4o", {"text": (100, 10)})
        plain.outcome("csat", 2)
        with pytest.raises(RuntimeError, match="async with"):
            block.__exit__(None, None, None)


@pytest.mark.parametrize(
    ("outcomes", "field", "said"),
    [
        ([outcome("a", "boolean", at_least=1)], "experience_type.outcomes[0].goal", "`equals` true or false"),
        ([outcome("a", "likert_5", at_least=6)], "experience_type.outcomes[0].goal", "within the scale, 1 to 5"),
        ([outcome("a", "number", equals=True)], "experience_type.outcomes[0].goal", "`equals` is for BOOLEAN"),
        ([outcome("a", "number"), outcome("a", "boolean")], "experience_type.outcomes[1].name", "declared twice"),
        ([outcome("bad name", "number")], "experience_type.outcomes[0].name", "must match"),
        ([outcome(f"o{i}", "number") for i in range(33)], "experience_type.outcomes", "at most 32 outcomes"),
    ],
)
async def test_bad_declarations_are_refused_naming_the_field(stubs, outcomes, field, said):
    name = unique("BadDeclared")
    async with AsyncTallyClient(stubs.target) as tally:
        with pytest.raises(InvalidArgument) as refused:
            await tally.create_experience_type(name, "Refused", outcomes=outcomes)
        assert said in refused.value.field_violations[field]
        with pytest.raises(NotFound):
            await tally.get_experience_type(name)
        await tally.create_experience_type(name, "Declared later", outcomes=OUTCOMES[:1])
        with pytest.raises(InvalidArgument) as refused:
            await tally.update_experience_type(name, outcomes=outcomes)
        assert said in refused.value.field_violations[field]
        assert [o.name for o in (await tally.get_experience_type(name)).outcomes] == ["resolved"], "unchanged"


async def test_bad_values_are_refused_naming_the_field_and_change_nothing(stubs):
    name = unique("BadValues")
    async with AsyncTallyClient(stubs.target) as tally:
        await tally.create_experience_type(name, "Scored", outcomes=OUTCOMES)
        run = await tally.create_experience(name)
        await tally.record_outcomes(run.experience_id, {"csat": 4})
        for values, field, said in (
            ({"nps": 9}, "values[0].name", "declares no outcome 'nps'"),
            ({"resolved": 1}, "values[0].bool_value", "'resolved' is BOOLEAN"),
            ({"csat": True}, "values[0].number_value", "'csat' is LIKERT_5"),
            ({"csat": 4.5}, "values[0].number_value", "a whole number from 1 to 5, got 4.5"),
            ({"csat": 6}, "values[0].number_value", "a whole number from 1 to 5, got 6"),
            ({"accuracy": 101}, "values[0].number_value", "0 to 100, got 101"),
            ({"turns": float("inf")}, "values[0].number_value", "finite"),
            ({"csat": 5, "accuracy": -1}, "values[1].number_value", "0 to 100"),
        ):
            with pytest.raises(InvalidArgument) as refused:
                await tally.record_outcomes(run.experience_id, values)
            assert said in refused.value.field_violations[field], (values, refused.value.field_violations)
        assert as_dict((await tally.get_experience(run.experience_id)).outcomes) == {"csat": (4.0, True)}
        assert await changes(stubs.server, run.experience_id) == 1, "nothing changed"
        with pytest.raises(InvalidArgument) as refused:
            await tally.record_outcomes(run.experience_id, {})
        assert "1 to 32 values" in refused.value.field_violations["values"]
        with pytest.raises(NotFound):
            await tally.record_outcomes(uuid.uuid4(), {"csat": 4})
        with pytest.raises(InvalidArgument) as refused:
            await tally.record_outcomes("not-a-uuid", {"csat": 4})
        assert "not a UUID" in refused.value.field_violations["experience_id"]


async def test_every_change_is_listed_oldest_first_page_by_page(stubs):
    name = unique("History")
    async with AsyncTallyClient(stubs.target) as tally:
        await tally.create_experience_type(name, "Scored again and again", outcomes=OUTCOMES[:2])
        run = await tally.create_experience(name)
        for value in (3, 4, 4, 5):  # the repeated 4 adds no change
            await tally.record_outcomes(run.experience_id, {"csat": value})
        await tally.record_outcomes(run.experience_id, {"resolved": False})
        seen, token = [], ""
        while True:
            page = await tally.list_outcome_changes(run.experience_id, page_size=2, page_token=token)
            seen += [(c.value.name, c.value.WhichOneof("value"), c.key_name) for c in page.changes]
            values = [c.value.number_value or c.value.bool_value for c in page.changes]
            assert all(not c.HasField("succeeded") for c in page.changes) and values
            token = page.next_page_token
            if not token:
                break
        assert seen == [("csat", "number_value", "")] * 3 + [("resolved", "bool_value", "")]
        with pytest.raises(NotFound):
            await tally.list_outcome_changes(uuid.uuid4())
