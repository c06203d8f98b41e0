"""Who did what after the fact: with keys required, a run's outcomes and their changes, an
event's annotations and an experience's properties each keep the name of the API key that
set them, and when; a key that only reads can set none of them."""

from __future__ import annotations

import aiohttp
import grpc
import pytest

from tally_client import AsyncTallyClient, TallyError, outcome, usage_event
from tally_server.app import TallyServer
from tally_server.config import Settings

from .conftest import drop_database_url, make_database_url


async def test_each_change_after_the_fact_names_its_key(backend, tmp_path):
    url = await make_database_url(backend, tmp_path)
    server = TallyServer(Settings(listen="127.0.0.1:0", database_url=url, grace_seconds=1, auth="required"))
    await server.start()
    target = f"127.0.0.1:{server.port}"
    try:
        secrets = {}
        for name, scopes in (("pipeline", ["admin", "ingest"]), ("support-desk", ["ingest"]), ("viewer", ["read"])):
            _, secrets[name] = await server.keys.create(name, scopes)
        async with (
            AsyncTallyClient(target, api_key=secrets["pipeline"]) as pipeline,
            AsyncTallyClient(target, api_key=secrets["support-desk"]) as desk,
            AsyncTallyClient(target, api_key=secrets["viewer"]) as viewer,
        ):
            await pipeline.create_experience_type("Ticket", "One ticket", outcomes=[outcome("resolved", "boolean")])
            run = await pipeline.create_experience("Ticket", properties={"channel": "email", "tier": "gold"})
            assert [(u.key, u.key_name) for u in run.property_updates] == [
                ("channel", "pipeline"),
                ("tier", "pipeline"),
            ]
            event = usage_event("system.openai", "gpt-4o", {"text": (100, 10)})
            event.context.experience_id = run.experience_id
            stored = await pipeline.ingest(event)
            await pipeline.record_outcomes(run.experience_id, {"resolved": False})
            await desk.record_outcomes(run.experience_id, {"resolved": True})
            await desk.annotate_event(stored.request_id, set_annotations={"ticket": "T-42"})
            updated = await desk.update_experience_properties(
                run.experience_id, set_properties={"tier": "platinum"}, remove_keys=["channel"]
            )
            assert [(u.key, u.key_name) for u in updated.property_updates] == [("tier", "support-desk")]
            for denied in (
                viewer.record_outcomes(run.experience_id, {"resolved": False}),
                viewer.annotate_event(stored.request_id, set_annotations={"ticket": "T-43"}),
                viewer.update_experience_properties(run.experience_id, set_properties={"tier": "bronze"}),
            ):
                with pytest.raises(TallyError) as refused:
                    await denied
                assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED
            got = await viewer.get_experience(run.experience_id)
            assert dict(got.properties) == {"tier": "platinum"}
            assert [(u.key, u.key_name) for u in got.property_updates] == [("tier", "support-desk")]
            assert got.property_updates[0].update_time.seconds > 0
            assert [(o.value.name, o.value.bool_value, o.key_name) for o in got.outcomes] == [
                ("resolved", True, "support-desk")
            ]
            changes = await viewer.list_outcome_changes(run.experience_id)
            assert [(c.value.bool_value, c.key_name) for c in changes.changes] == [
                (False, "pipeline"),
                (True, "support-desk"),
            ]
            (annotated,) = (await viewer.get_event(stored.request_id)).annotations
            assert (annotated.key, annotated.value, annotated.key_name) == ("ticket", "T-42", "support-desk")
    finally:
        await server.stop()
        await drop_database_url(url)


async def test_spend_by_api_key_names_the_key_that_sent_each_event(backend, tmp_path):
    """BreakDownCost by API key and the dashboard's spend by key: each event under the key
    that ingested it, with its events, tokens and cost; both answers the same."""
    url = await make_database_url(backend, tmp_path)
    settings = Settings(
        listen="127.0.0.1:0", database_url=url, grace_seconds=1, auth="required", web_listen="127.0.0.1:0"
    )
    server = TallyServer(settings)
    await server.start()
    target = f"127.0.0.1:{server.port}"
    try:
        secrets = {}
        for name, scopes in (("batch-jobs", ["ingest"]), ("chat-frontend", ["ingest"]), ("viewer", ["read"])):
            _, secrets[name] = await server.keys.create(name, scopes)
        sent = {"batch-jobs": [(1_000, 100)] * 3, "chat-frontend": [(50_000, 2_000), (7, 0)]}
        for name, usages in sent.items():
            async with AsyncTallyClient(target, api_key=secrets[name]) as sender:
                for tokens in usages:
                    await sender.ingest(usage_event("system.openai", "gpt-4o", {"text": tokens}))
        async with AsyncTallyClient(target, api_key=secrets["viewer"]) as viewer:
            by_key = await viewer.break_down_cost(["key"])
        got = {g.api_key_name: (g.event_count, g.input_tokens, g.output_tokens) for g in by_key.groups}
        assert got == {
            name: (len(usages), sum(t[0] for t in usages), sum(t[1] for t in usages)) for name, usages in sent.items()
        }
        costs = {g.api_key_name: g.cost_total.units * 10**9 + g.cost_total.nanos for g in by_key.groups}
        assert costs["chat-frontend"] > costs["batch-jobs"] > 0
        headers = {"Authorization": f"Bearer {secrets['viewer']}"}
        async with (
            aiohttp.ClientSession(headers=headers) as session,
            session.get(f"http://127.0.0.1:{server.web_port}/api/spend_by?by=key&days=1") as answer,
        ):
            assert answer.status == 200, await answer.text()
            shown = await answer.json()
        assert [(g["name"], g["events"], g["tokens_in"]) for g in shown["groups"]] == [
            (g.api_key_name, g.event_count, g.input_tokens) for g in by_key.groups
        ]
        assert [g["cost"] for g in shown["groups"]] == [
            f"{costs[g.api_key_name] // 10**9}.{costs[g.api_key_name] % 10**9:09d}" for g in by_key.groups
        ]
    finally:
        await server.stop()
        await drop_database_url(url)
