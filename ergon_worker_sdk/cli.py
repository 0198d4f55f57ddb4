"""`ergon`: the command line for people, over gRPC only.

    ergon flows list [--status S] [--type T] [--limit N] [--page-token T]
    ergon flows show FLOW_ID
    ergon schedule TYPE [--json '{"order_id": "A"}'] [--flow-id ID] [--wait SECONDS]
    ergon signal FLOW_ID NAME --json '{"by": "ann"}'
    ergon cancel FLOW_ID [--reason TEXT]
    ergon workers

Tables (coloured on a terminal) by default; `--json` prints JSON for scripts. Connection
options: --address (ERGON_ADDRESS), --token (ERGON_TOKEN), --tls-ca/--tls-cert/--tls-key
(ERGON_TLS_CA, ERGON_TLS_CERT, ERGON_TLS_KEY).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import enum
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

from ergon_worker_sdk._client import Client, FlowOutcome, FlowStatus, TlsConfig, channel_target
from ergon_worker_sdk.errors import ErgonError, RpcError

# Exit statuses; argparse exits 2 on a usage error.
EXIT_OK = 0
EXIT_FAILED = 1
_EXIT_STATUSES = """exit status:
  0  done; with `schedule --wait`, the flow COMPLETED
  1  an error (the server's code and reason on stderr); with `schedule --wait`,
     the flow ended FAILED or CANCELLED (its outcome is printed), or had not
     ended within SECONDS
  2  bad usage (a bad option, or --json that is not JSON)"""

# Flows asked for per ListFlows call (the server may give fewer: its --max-page-size).
_PAGE_SIZE = 1000

_COLOURS = {
    "COMPLETED": "32",
    "FAILED": "31",
    "CANCELLED": "33",
    "RUNNING": "36",
    "WAITING": "35",
    "PENDING": "37",
}


class Output:
    """Where results go: aligned tables for people, JSON for scripts."""

    def __init__(self, as_json: bool, stream: Any = None) -> None:
        self.as_json = as_json
        self.stream = stream or sys.stdout
        self.colour = not as_json and self.stream.isatty() and not os.environ.get("NO_COLOR")

    def paint(self, text: str) -> str:
        """Colour a status word on a terminal."""
        code = _COLOURS.get(text)
        return f"\033[{code}m{text}\033[0m" if self.colour and code else text

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        """Print rows under headers, columns aligned."""
        widths = [len(h) for h in headers]
        for row in rows:
            widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
        for row in rows:
            cells = [
                self.paint(cell) + " " * (w - len(cell))
                for cell, w in zip(row, widths, strict=True)
            ]
            lines.append("  ".join(cells).rstrip())
        print("\n".join(lines), file=self.stream)

    def json(self, value: Any) -> None:
        """Print a value as JSON."""
        print(json.dumps(value, indent=2, default=_jsonable), file=self.stream)


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    if isinstance(value, enum.Enum):
        return value.name
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return repr(value)


def _when(moment: datetime.datetime | None) -> str:
    return "" if moment is None else moment.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, default=_jsonable) if value is not None else ""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _flow_dict(flow: FlowOutcome) -> dict[str, Any]:
    return dataclasses.asdict(flow) | {"status": flow.status.name}


async def flows_list(client: Client, out: Output, args: argparse.Namespace) -> int:
    """List flows oldest first, filtered, at most --limit; say on stderr when more match."""
    found: list[FlowOutcome] = []
    token: str = args.page_token or ""
    # Page by page rather than with `Client.list_flows`: the token after the last row shown is
    # what lets the next listing carry on from it.
    while True:
        page = await client.list_flows_page(
            status=[FlowStatus[s.upper()] for s in args.status or []],
            flow_type=args.type or None,
            page_size=min(args.limit - len(found), _PAGE_SIZE),
            page_token=token,
        )
        found += page.flows
        token = page.next_page_token
        if not token or len(found) >= args.limit:
            break
    if out.as_json:
        out.json([_flow_dict(f) for f in found])
    else:
        out.table(
            ["FLOW ID", "TYPE", "STATUS", "ATTEMPT", "CREATED", "ENDED"],
            [
                [
                    f.flow_id,
                    f.flow_type,
                    f.status.name,
                    str(f.attempt),
                    _when(f.created_at),
                    _when(f.completed_at),
                ]
                for f in found
            ],
        )
    if token:
        # On stderr, so that the table or the JSON on stdout stays whole.
        print(
            f"... more flows match: raise --limit (now {args.limit}), "
            f"or add --page-token {token} for the next ones",
            file=sys.stderr,
        )
    return EXIT_OK


def _print_flow(out: Output, flow: FlowOutcome) -> None:
    print(f"flow     {flow.flow_id}", file=out.stream)
    print(f"type     {flow.flow_type}", file=out.stream)
    print(f"status   {out.paint(flow.status.name)} (attempt {flow.attempt})", file=out.stream)
    print(f"created  {_when(flow.created_at)}", file=out.stream)
    if flow.completed_at:
        print(f"ended    {_when(flow.completed_at)}", file=out.stream)
    if flow.result is not None:
        print(f"result   {_short(flow.result, 200)}", file=out.stream)
    if flow.error is not None:
        reason = f" [{flow.error.reason}]" if flow.error.reason else ""
        print(f"error    {flow.error.type}: {flow.error.message}{reason}", file=out.stream)


async def flows_show(client: Client, out: Output, args: argparse.Namespace) -> int:
    """One flow: status, result or error, and its journal with timings."""
    flow = await client.get(args.flow_id)
    journal = await client.history(args.flow_id)
    if out.as_json:
        out.json(_flow_dict(flow) | {"journal": [dataclasses.asdict(e) for e in journal]})
        return EXIT_OK
    _print_flow(out, flow)
    print(file=out.stream)
    start = flow.created_at
    rows = []
    for entry in journal:
        offset = (entry.recorded_at - start).total_seconds() * 1000 if start else 0.0
        outcome = entry.error.message if entry.error else _short(entry.result)
        rows.append(
            [
                str(entry.sequence),
                entry.key,
                entry.kind,
                entry.status,
                str(entry.attempts),
                f"+{offset:.0f} ms",
                outcome,
            ]
        )
    out.table(["SEQ", "KEY", "KIND", "STATUS", "ATTEMPTS", "AT", "RESULT"], rows)
    return EXIT_OK


def _seconds(text: str) -> float:
    """An argparse type: a duration in seconds, not negative."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number, not negative: {text!r}")
    return value


def _limit(text: str) -> int:
    """An argparse type: how many rows, at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _json_value(text: str) -> Any:
    """An argparse type: a JSON document."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON: {error}") from None


async def schedule(client: Client, out: Output, args: argparse.Namespace) -> int:
    """Schedule a flow by type name; with --wait, then wait for its outcome (one call).

    With --wait, the exit status says how the flow ended: EXIT_OK if it completed,
    EXIT_FAILED if it failed, was cancelled or had not ended in time.
    """
    if args.wait is None:
        flow_id = await client.schedule_type(args.flow_type, args.input, flow_id=args.flow_id)
        if out.as_json:
            out.json({"flow_id": flow_id})
        else:
            print(flow_id, file=out.stream)
        return EXIT_OK
    try:
        flow = await client.run_type(
            args.flow_type, args.input, flow_id=args.flow_id, timeout=args.wait
        )
    except TimeoutError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAILED
    if out.as_json:
        out.json(_flow_dict(flow))
    else:
        _print_flow(out, flow)
    return EXIT_OK if flow.status is FlowStatus.COMPLETED else EXIT_FAILED


async def signal(client: Client, out: Output, args: argparse.Namespace) -> int:
    """Send a signal to a flow."""
    sequence = await client.signal(args.flow_id, args.name, args.payload)
    if out.as_json:
        out.json({"flow_id": args.flow_id, "name": args.name, "sequence": sequence})
    else:
        print(f"signal {args.name} #{sequence} delivered to {args.flow_id}", file=out.stream)
    return EXIT_OK


async def cancel(client: Client, out: Output, args: argparse.Namespace) -> int:
    """Cancel a flow."""
    flow = await client.cancel(args.flow_id, args.reason or "")
    if out.as_json:
        out.json(_flow_dict(flow))
    elif flow.status is FlowStatus.CANCELLED:
        print(f"{flow.flow_id} {out.paint('CANCELLED')}", file=out.stream)
    else:
        print(f"{flow.flow_id} is running: it will stop at its next step", file=out.stream)
    return EXIT_OK


async def workers(client: Client, out: Output, args: argparse.Namespace) -> int:
    """The connected worker sessions."""
    found = await client.workers()
    if out.as_json:
        out.json([dataclasses.asdict(w) for w in found])
        return EXIT_OK
    out.table(
        ["WORKER", "SESSION", "TYPES", "LOAD", "ASSIGNED", "CONNECTED", "PEER"],
        [
            [
                w.worker_id,
                w.session_id[:12],
                ",".join(w.flow_types),
                f"{w.running}/{w.capacity}",
                str(w.assigned_total),
                _when(w.connected_at),
                w.peer,
            ]
            for w in found
        ],
    )
    return EXIT_OK


def _address(text: str) -> str:
    """An argparse type: one address, or several IP:port (replicas) separated by commas.

    The string goes to `Client` as it is: the SDK reads commas the same way.
    """
    try:
        channel_target(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _json_output(command: argparse.ArgumentParser) -> None:
    # After the command too (`ergon flows list --json`); SUPPRESS keeps a --json given before it.
    command.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print JSON, for scripts"
    )


def parser() -> argparse.ArgumentParser:
    """The command line's grammar."""
    env = os.environ
    root = argparse.ArgumentParser(
        prog="ergon",
        description=__doc__,
        epilog=_EXIT_STATUSES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    root.add_argument(
        "--address",
        type=_address,
        default=env.get("ERGON_ADDRESS", "127.0.0.1:50051"),
        help="host:port, or several IP:port separated by commas (replicas, round-robin)",
    )
    root.add_argument("--token", default=env.get("ERGON_TOKEN"), help="bearer token")
    root.add_argument("--tls", action="store_true", help="TLS with the system's roots")
    root.add_argument("--tls-ca", default=env.get("ERGON_TLS_CA"), help="PEM CA bundle")
    root.add_argument("--tls-cert", default=env.get("ERGON_TLS_CERT"), help="PEM client cert")
    root.add_argument("--tls-key", default=env.get("ERGON_TLS_KEY"), help="PEM client key")
    root.add_argument("--json", action="store_true", help="print JSON, for scripts")
    commands = root.add_subparsers(dest="command", required=True)
    flows = commands.add_parser("flows", help="list or show flows")
    flow_commands = flows.add_subparsers(dest="flows_command", required=True)
    listing = flow_commands.add_parser(
        "list",
        help="list flows, oldest first",
        description="Flows in the order they were scheduled, oldest first, at most --limit. "
        "When more match, a last line on stderr says how to see them: a larger --limit, or "
        "--page-token to carry on after the last flow shown.",
    )
    listing.add_argument(
        "--status",
        action="append",
        choices=[s.name for s in FlowStatus],
        help="only flows in this status (repeat for several)",
    )
    listing.add_argument("--type", help="only flows of this type")
    listing.add_argument(
        "--limit", type=_limit, default=100, metavar="N", help="print at most N flows (default 100)"
    )
    listing.add_argument(
        "--page-token",
        metavar="T",
        help="start after the last flow an earlier listing showed (its stderr gives T); "
        "give the same --status and --type",
    )
    _json_output(listing)
    listing.set_defaults(run=flows_list)
    show = flow_commands.add_parser("show", help="a flow and its journal")
    show.add_argument("flow_id")
    _json_output(show)
    show.set_defaults(run=flows_show)
    scheduling = commands.add_parser(
        "schedule",
        help="schedule a flow by type name",
        description="Schedule a flow by type name and print its id; with --wait, wait for\n"
        "it to end and print its outcome.",
        epilog=_EXIT_STATUSES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    scheduling.add_argument("flow_type")
    scheduling.add_argument(
        "--json",
        dest="input",
        type=_json_value,
        default="{}",
        metavar="JSON",
        help="the input, as a JSON object (default {}: a flow type without fields)",
    )
    scheduling.add_argument("--flow-id", help="the business key (default: generated)")
    scheduling.add_argument(
        "--wait",
        type=_seconds,
        metavar="SECONDS",
        help="then wait up to SECONDS for the flow to end and print its outcome",
    )
    scheduling.set_defaults(run=schedule)
    signalling = commands.add_parser("signal", help="send a signal to a flow")
    signalling.add_argument("flow_id")
    signalling.add_argument("name")
    signalling.add_argument(
        "--json",
        dest="payload",
        type=_json_value,
        metavar="JSON",
        help="the payload, as JSON (default: null)",
    )
    signalling.set_defaults(run=signal)
    cancelling = commands.add_parser("cancel", help="cancel a flow")
    cancelling.add_argument("flow_id")
    cancelling.add_argument("--reason")
    _json_output(cancelling)
    cancelling.set_defaults(run=cancel)
    listing_workers = commands.add_parser("workers", help="connected workers and their load")
    _json_output(listing_workers)
    listing_workers.set_defaults(run=workers)
    return root


async def _run(args: argparse.Namespace) -> int:
    tls: TlsConfig | bool | None = None
    if args.tls_ca or args.tls_cert:
        tls = TlsConfig.from_files(args.tls_ca, args.tls_cert, args.tls_key)
    elif args.tls:
        tls = True
    async with Client(args.address, token=args.token, tls=tls, retry_timeout_s=5) as client:
        status: int = await args.run(client, Output(args.json), args)
        return status


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `ergon` console script."""
    args = parser().parse_args(argv)
    try:
        return asyncio.run(_run(args))
    except RpcError as error:
        reason = f" {error.reason}" if error.reason else ""
        print(f"error: {error.code.name}{reason}: {error.message}", file=sys.stderr)
        return EXIT_FAILED
    except ErgonError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAILED
    except BrokenPipeError:
        # The reader went away (`ergon flows list | head`): what it wanted was written. Output
        # still buffered would raise again at exit, so stdout goes nowhere from here.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
