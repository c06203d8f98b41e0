"""The server under test: a real TallyServer plus no-op baselines on the same stack.

`/bench.Noop/Unary` takes an IngestRequest and answers a fixed IngestResponse;
`/bench.Noop/Stream` answers each IngestStreamRequest with a fixed
IngestStreamResponse. Both run through the same grpc.aio server, interceptor and
(de)serialization as Tally's own RPCs, so a ratio against them isolates what
Tally does per event: validation, resolution, pricing and the durable commit.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

import grpc

from tally.v1 import ingest_service_pb2 as pb
from tally_server.app import TallyServer, configure_logging, run_event_loop
from tally_server.config import Settings
from tally_server.rpc.convert import money

RESPONSE = pb.IngestResponse(
    request_id="01a2218e-58e7-7ffb-ae46-5784d6eff6e3",
    xproxy_result=pb.XProxyResult(
        request_id="01a2218e-58e7-7ffb-ae46-5784d6eff6e3",
        cost_input=money(2_500_000),
        cost_output=money(1_000_000),
        cost_total=money(3_500_000),
        cost_state=pb.COST_STATE_PRICED,
        experience_id="01a2218e-58e2-76ea-a615-39c103b24d2a",
        experience_name="Document_Summarization",
        experience_version=1,
    ),
)


async def noop_unary(request: pb.IngestRequest, context) -> pb.IngestResponse:
    return RESPONSE


async def noop_stream(requests, context):
    position = 0
    async for request in requests:
        yield pb.IngestStreamResponse(position=position, idempotency_key=request.event.idempotency_key, result=RESPONSE)
        position += 1


NOOP = grpc.method_handlers_generic_handler(
    "bench.Noop",
    {
        "Unary": grpc.unary_unary_rpc_method_handler(
            noop_unary,
            request_deserializer=pb.IngestRequest.FromString,
            response_serializer=pb.IngestResponse.SerializeToString,
        ),
        "Stream": grpc.stream_stream_rpc_method_handler(
            noop_stream,
            request_deserializer=pb.IngestStreamRequest.FromString,
            response_serializer=pb.IngestStreamResponse.SerializeToString,
        ),
    },
)


async def main(database_url: str) -> None:
    settings = Settings(listen="127.0.0.1:0", database_url=database_url, log_level="warning", web_listen="127.0.0.1:0")
    server = TallyServer(settings, (NOOP,))
    await server.start()
    print(f"PORT {server.port} {server.web_port}", flush=True)  # gRPC, then the dashboard
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--database-url", required=True)
    configure_logging("warning")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    run_event_loop(main(parser.parse_args().database_url))
