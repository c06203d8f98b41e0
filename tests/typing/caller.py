"""A caller as the README writes one: `mypy --strict` must accept it as it is."""

from __future__ import annotations

import asyncio
from decimal import Decimal

from tally_client import AsyncTallyClient, TallyClient, create_metadata, dollars, usage_event
from tally_client.instrument import openai_event


def summarize(tally: TallyClient, documents: list[str]) -> Decimal:
    tally.create_experience_type("Document_Summarization", "Summarize one uploaded document")
    total = Decimal(0)
    for document in documents:
        with tally.experience("Document_Summarization") as run:
            tally.ingest("system.openai", "gpt-4o", {"text": (1000, 100)}, properties={"document": document})
            tally.ingest("system.openai", "gpt-4o", {"text": (2000, 300)}, idempotency_key=f"{document}-2")
        total += dollars(tally.get_experience(run.experience_id).stats.cost_total)
    page = tally.list_experiences("Document_Summarization", page_size=10)
    for experience in page.experiences:
        print(experience.experience_id, experience.experience_version)
    stats = tally.get_experience_type_stats("Document_Summarization", version=1)
    print(dollars(stats.total.p95_cost_per_experience))
    price = tally.create_custom_price("custom.acme", "acme-llm-7b", {"text": ("0.20", "0.60")}).price
    quote = tally.quote_price("custom.acme", "acme-llm-7b", {"text": (10_000, 2_000)})
    print(price.price_id, dollars(quote.cost_total), tally.get_custom_price(price.price_id).resource)
    print(len(tally.list_custom_prices(category="custom.acme").prices))
    batch = tally.ingest_batch([usage_event("system.openai", "gpt-4o-mini", {"text": {"input": 5}})])
    print(batch.accepted_count, batch.items[0].result.xproxy_result.cost_state)
    metadata = create_metadata(experience_name="Document_Summarization", request_tags=["beta"])
    for answer in tally.ingest_stream([usage_event("system.openai", "gpt-4o", {"text": (1, 1)})], metadata):
        print(answer.position, answer.result.xproxy_result.experience_id)
    print(tally.ingest(openai_event({"id": "x", "model": "gpt-4o", "usage": {}})).request_id)
    return total


async def summarize_async(target: str) -> int:
    async with AsyncTallyClient(target) as tally:
        with tally.experience("Document_Summarization") as run:
            response = await tally.ingest("system.openai", "gpt-4o", {"text": (1000, 100)}, latency_ms=850)
        experience = await tally.get_experience(run.experience_id)
        async for answer in tally.ingest_stream([usage_event("system.openai", "gpt-4o", {"text": (1, 1)})]):
            print(answer.position)
        return experience.stats.event_count + len(response.xproxy_result.warnings)


if __name__ == "__main__":
    with TallyClient("127.0.0.1:50051") as client:
        print(summarize(client, ["q3-report.pdf"]))
    print(asyncio.run(summarize_async("127.0.0.1:50051")))
