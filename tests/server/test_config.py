"""Server configuration: flags, ERGON_* variables, limits with safe defaults."""

from __future__ import annotations

import pytest

from ergon_server.config import parse_args
from ergon_worker_sdk.proto.ergon.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from ergon_worker_sdk.testing import ErgonTestServer


def test_defaults_flags_and_environment() -> None:
    config = parse_args([], environ={})
    assert (config.listen, config.db) == ("127.0.0.1:50051", "sqlite:///ergon.db")
    assert config.engine.max_page_size == 1000 and config.engine.max_streams_per_client == 200
    assert config.max_message_bytes > config.engine.max_payload_bytes
    config = parse_args(
        ["--max-page-size", "7", "--lease-ttl", "6", "--heartbeat-interval", "2"],
        environ={"ERGON_DB": "memory://", "ERGON_MAX_STREAMS_PER_CLIENT": "3"},
    )
    assert (config.db, config.engine.max_page_size, config.engine.max_streams_per_client) == (
        "memory://",
        7,
        3,
    )
    assert (config.engine.lease_ttl_ms, config.engine.heartbeat_interval_ms) == (6000, 2000)


@pytest.mark.parametrize(
    "argv",
    [
        ["--max-message-bytes", "1000", "--max-payload-bytes", "2000"],
        ["--heartbeat-interval", "10", "--lease-ttl", "15"],
        ["--tls-cert", "x.pem"],
        ["--max-page-size", "0"],
    ],
    ids=["message-below-payload", "heartbeat-too-slow", "cert-without-key", "zero-page"],
)
def test_inconsistent_settings_are_refused_at_start(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(argv, environ={})


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("ERGON_LEASE_TTL", "abc", "'abc' is not a number of seconds"),
        ("ERGON_MAX_PAGE_SIZE", "lots", "'lots' is not a whole number"),
        ("ERGON_SQLITE_SYNCHRONOUS", "fast", "'fast' is not one of FULL, NORMAL"),
        ("ERGON_LOG_LEVEL", "LOUD", "'LOUD' is not one of DEBUG, INFO"),
        ("ERGON_LOG_FORMAT", "xml", "'xml' is not one of auto, json, text"),
        ("ERGON_ALLOW_UNREGISTERED_FLOW_TYPES", "maybe", "'maybe' is neither on"),
    ],
)
def test_a_bad_variable_is_refused_by_name_like_a_bad_flag(
    variable: str, value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Never a traceback, never a silent fallback (a mistyped durability setting must not
    # quietly give a weaker one).
    with pytest.raises(SystemExit) as exit_info:
        parse_args([], environ={variable: value})
    assert exit_info.value.code == 2
    assert f"{variable}: {message}" in capsys.readouterr().err


def test_variables_and_flags_take_any_case_and_the_usual_switch_words() -> None:
    config = parse_args(
        [],
        environ={
            "ERGON_SQLITE_SYNCHRONOUS": "normal",
            "ERGON_LOG_LEVEL": "debug",
            "ERGON_LOG_FORMAT": "JSON",
            "ERGON_ALLOW_UNREGISTERED_FLOW_TYPES": "True",
        },
    )
    assert (config.sqlite_synchronous, config.log_level, config.log_format) == (
        "NORMAL",
        "DEBUG",
        "json",
    )
    assert config.engine.allow_unregistered_flow_types
    for off in ("0", "false", "No", "OFF", ""):
        config = parse_args([], environ={"ERGON_ALLOW_UNREGISTERED_FLOW_TYPES": off})
        assert not config.engine.allow_unregistered_flow_types
    config = parse_args(["--log-level", "warning", "--sqlite-synchronous", "Full"], environ={})
    assert (config.log_level, config.sqlite_synchronous) == ("WARNING", "FULL")
    with pytest.raises(SystemExit):
        parse_args(["--log-level", "loud"], environ={})


async def test_list_pages_are_capped_by_max_page_size() -> None:
    import grpc

    async with (
        ErgonTestServer(
            db="memory://", max_page_size=3, allow_unregistered_flow_types=True
        ) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        payload = common_pb2.Payload(encoding="json/plain", data=b"{}")
        for n in range(5):
            await stub.ScheduleFlow(
                scheduler_pb2.ScheduleFlowRequest(flow_id=f"p{n}", flow_type="T", input=payload)
            )
        page = await stub.ListFlows(scheduler_pb2.ListFlowsRequest(page_size=1000))
        assert len(page.flows) == 3 and page.next_page_token
