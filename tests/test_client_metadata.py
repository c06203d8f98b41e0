"""The sync client's exact metadata, asserted with grpc_testing (sync stubs only: never
for async servicers, where it reports success without running them)."""

from __future__ import annotations

import threading

import grpc
import grpc_testing

from tally.v1 import ingest_service_pb2 as pb
from tally_client import TallyClient

INGEST = pb.DESCRIPTOR.services_by_name["IngestService"].methods_by_name["Ingest"]


def call_in_thread(function):
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("value", function()))
    thread.start()
    return thread, outcome


def test_experience_context_metadata_key_for_key():
    channel = grpc_testing.channel([pb.DESCRIPTOR.services_by_name["IngestService"]], grpc_testing.strict_real_time())
    client = TallyClient(channel=channel)

    def run() -> list:
        with client.experience("Document_Summarization", version=2, user_id="alice", tags=["beta", "eu"]):
            first = client.ingest("system.openai", "gpt-4o", {"text": (1, 1)})
            second = client.ingest("system.openai", "gpt-4o", {"text": (1, 1)})
        return [first, second]

    thread, outcome = call_in_thread(run)
    metadata_seen = []
    for experience_id in ("0b6a8f0e-3c4d-4e5f-8a9b-1c2d3e4f5a6b", "0b6a8f0e-3c4d-4e5f-8a9b-1c2d3e4f5a6b"):
        metadata, request, rpc = channel.take_unary_unary(INGEST)
        # grpc_testing adds ('grpc.metadata_added_by_runtime', ...) to show that the runtime may add keys.
        metadata_seen.append(tuple((k, v) for k, v in metadata if not k.startswith("grpc.")))
        assert request.event.resource == "gpt-4o"
        response = pb.IngestResponse(xproxy_result=pb.XProxyResult(experience_id=experience_id))
        rpc.terminate(response, (), grpc.StatusCode.OK, "")
    thread.join(10)
    assert metadata_seen[0] == (
        ("xproxy-experience-name", "Document_Summarization"),
        ("xproxy-experience-version", "2"),
        ("xproxy-user-id", "alice"),
        ("xproxy-request-tags", "beta,eu"),
    )
    # After the first call created the experience, its id goes with every call.
    assert metadata_seen[1] == (
        ("xproxy-experience-id", "0b6a8f0e-3c4d-4e5f-8a9b-1c2d3e4f5a6b"),
        ("xproxy-experience-name", "Document_Summarization"),
        ("xproxy-user-id", "alice"),
        ("xproxy-request-tags", "beta,eu"),
    )
    assert len(outcome["value"]) == 2


def test_calls_outside_a_context_send_no_xproxy_metadata():
    channel = grpc_testing.channel([pb.DESCRIPTOR.services_by_name["IngestService"]], grpc_testing.strict_real_time())
    client = TallyClient(channel=channel, timeout=3.0)
    thread, _ = call_in_thread(lambda: client.ingest("system.openai", "gpt-4o", {"text": (1, 1)}))
    metadata, _, rpc = channel.take_unary_unary(INGEST)
    assert not [key for key, _ in metadata if key.startswith("xproxy-")]
    rpc.terminate(pb.IngestResponse(), (), grpc.StatusCode.OK, "")
    thread.join(10)
