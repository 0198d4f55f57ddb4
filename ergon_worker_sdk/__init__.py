"""Ergon's Python SDK: define flows, run workers, schedule and follow flows over gRPC.

from ergon_worker_sdk import flow_type, flow, step, Client, Scheduler, Worker, RetryPolicy
"""

from ergon_worker_sdk._client import (
    Client,
    FlowError,
    FlowOutcome,
    FlowPage,
    FlowStatus,
    JournalEntry,
    Scheduler,
    TlsConfig,
)
from ergon_worker_sdk._context import FlowContext, current_context
from ergon_worker_sdk._definitions import RetryPolicy, flow, flow_type, step
from ergon_worker_sdk._waits import (
    PendingChild,
    await_external_signal,
    dag,
    invoke,
    schedule_timer,
    schedule_timer_named,
)
from ergon_worker_sdk._worker import Worker, WorkerHandle
from ergon_worker_sdk.converter import JsonConverter, PayloadConverter, PickleConverter
from ergon_worker_sdk.errors import (
    ChildFlowError,
    DagExecutionError,
    ErgonError,
    FlowAlreadyScheduledError,
    FlowCancelledError,
    FlowClosedError,
    FlowNotFoundError,
    HistoryMismatchError,
    LeaseLostError,
    NonRetryableError,
    PayloadTooLargeError,
    RpcError,
    ServerUnavailableError,
    StepFailedError,
    UnknownFlowTypeError,
)

__all__ = [
    "ChildFlowError",
    "Client",
    "DagExecutionError",
    "ErgonError",
    "FlowAlreadyScheduledError",
    "FlowCancelledError",
    "FlowClosedError",
    "FlowContext",
    "FlowError",
    "FlowNotFoundError",
    "FlowOutcome",
    "FlowPage",
    "FlowStatus",
    "HistoryMismatchError",
    "JournalEntry",
    "JsonConverter",
    "LeaseLostError",
    "NonRetryableError",
    "PayloadConverter",
    "PayloadTooLargeError",
    "PendingChild",
    "PickleConverter",
    "RetryPolicy",
    "RpcError",
    "Scheduler",
    "ServerUnavailableError",
    "StepFailedError",
    "TlsConfig",
    "UnknownFlowTypeError",
    "Worker",
    "WorkerHandle",
    "await_external_signal",
    "current_context",
    "dag",
    "flow",
    "flow_type",
    "invoke",
    "schedule_timer",
    "schedule_timer_named",
    "step",
]
