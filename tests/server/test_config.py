"""Server configuration: flags, ERGON_* variables, limits with safe defaults."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
        # Out of range, or naming what cannot be used.
        ("ERGON_LEASE_TTL", "-1", "'-1' is less than 0.001"),
        ("ERGON_LEASE_TTL", "inf", "'inf' is not a finite number"),
        ("ERGON_HEARTBEAT_INTERVAL", "0", "'0' is less than 0.001"),
        ("ERGON_MAX_PAGE_SIZE", "0", "'0' is less than 1"),
        ("ERGON_MAX_STREAMS_PER_CLIENT", "-3", "'-3' is less than 1"),
        ("ERGON_MAX_PAYLOAD_BYTES", "0", "'0' is less than 1"),
        ("ERGON_MAX_MESSAGE_BYTES", "-1", "'-1' is less than 1"),
        ("ERGON_LISTEN", "localhost", "'localhost' is not host:port"),
        ("ERGON_METRICS_LISTEN", "9090", "'9090' is not host:port"),
        ("ERGON_TLS_CERT", "/no/such.pem", "cannot read /no/such.pem: No such file"),
        ("ERGON_TLS_KEY", "/no/such.key", "cannot read /no/such.key: No such file"),
        ("ERGON_TLS_CLIENT_CA", "/no/ca.pem", "cannot read /no/ca.pem: No such file"),
        ("ERGON_TOKENS_FILE", "/no/tokens", "cannot read /no/tokens: No such file"),
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


def test_settings_that_disagree_are_refused_naming_their_variables(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pem = tmp_path / "cert.pem"
    pem.write_text("not checked here")
    bad_tokens = tmp_path / "tokens.txt"
    bad_tokens.write_text("client-without-a-token\n")
    for environ, message in (
        (
            {"ERGON_HEARTBEAT_INTERVAL": "10"},
            "--heartbeat-interval (ERGON_HEARTBEAT_INTERVAL) must be at most half of "
            "--lease-ttl (ERGON_LEASE_TTL), got 10 s and 15 s",
        ),
        (
            {"ERGON_MAX_MESSAGE_BYTES": "1000"},
            "--max-message-bytes (ERGON_MAX_MESSAGE_BYTES) must exceed "
            "--max-payload-bytes (ERGON_MAX_PAYLOAD_BYTES), got 1000 and 2097152",
        ),
        (
            {"ERGON_TLS_CERT": str(pem)},
            "--tls-cert (ERGON_TLS_CERT) and --tls-key (ERGON_TLS_KEY) go together",
        ),
        (
            {"ERGON_TLS_CLIENT_CA": str(pem)},
            "--tls-client-ca (ERGON_TLS_CLIENT_CA) (mutual TLS) needs --tls-cert",
        ),
        ({"ERGON_DB": "ergon.db"}, "--db (ERGON_DB): store URL 'ergon.db' has no scheme"),
        ({"ERGON_DB": "mysql://x/y"}, "--db (ERGON_DB): store URL 'mysql://x/y': unknown"),
        (
            {"ERGON_TOKENS_FILE": str(bad_tokens)},
            f"--tokens-file (ERGON_TOKENS_FILE): {bad_tokens}: expected ROLE:TOKEN",
        ),
        ({"ERGON_TOKENS": "admin:short"}, "ERGON_TOKENS: tokens must be at least 16"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            parse_args([], environ=environ)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert f"ergon-server: error: {message}" in err, err


def test_a_bad_variable_stops_the_real_server_naming_it() -> None:
    process = subprocess.run(
        [sys.executable, "-m", "ergon_server", "--db", "memory://"],
        env={**os.environ, "ERGON_LEASE_TTL": "-1"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert process.returncode == 2
    assert "ergon-server: error: ERGON_LEASE_TTL: '-1' is less than 0.001" in process.stderr


def test_help_names_every_kind_of_store(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--help"], environ={})
    assert exit_info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    for url in ("sqlite:///ergon.db", "sqlite:////abs/path.db", "postgresql://", "memory://"):
        assert url in help_text, help_text


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
