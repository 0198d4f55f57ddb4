// The polyglot demo: Node schedules a Python flow, signals it, and runs a flow type of its own.
//   node demo.js 127.0.0.1:50051   (a Python worker for "PyApproval" must be running)
"use strict";

const { call, clients, decodePayload, jsonPayload } = require("./ergon");
const { startWorker, FLOW_TYPE } = require("./worker");

async function main(address) {
  const { scheduler, signals } = clients(address);
  const suffix = Date.now().toString(36);

  // 1. Schedule a flow whose type a Python worker runs; its input is JSON, as any SDK writes it.
  const py = await call(scheduler, "ScheduleFlow", {
    flow_id: `node-to-python-${suffix}`,
    flow_type: "PyApproval",
    input: jsonPayload({ item: "lamp" }),
  });
  console.log(`scheduled Python flow ${py.flow_id}`);

  // 2. Send it the signal it waits for.
  const sent = await call(signals, "SendSignal", {
    flow_id: py.flow_id, name: "approved", payload: jsonPayload({ by: "node" }), request_id: `sig-${suffix}`,
  });
  console.log(`signal approved #${sent.sequence} sent`);
  const waited = await call(scheduler, "WaitFlow", { flow_id: py.flow_id, timeout_ms: 20000 });
  console.log(`Python flow ${waited.flow.status}: ${JSON.stringify(decodePayload(waited.flow.result))}`);

  // 3. Run a flow type of our own; the Python client side schedules it (see the test), and so can we.
  const worker = await new Promise((resolve) => {
    const w = startWorker(address, "node-demo-worker", { onReady: () => resolve(w) });
  });
  const own = await call(scheduler, "ScheduleFlow", {
    flow_id: `node-own-${suffix}`, flow_type: FLOW_TYPE, input: jsonPayload({ name: "Ergon" }),
  });
  const done = await call(scheduler, "WaitFlow", { flow_id: own.flow_id, timeout_ms: 20000 });
  console.log(`Node flow ${done.flow.status}: ${JSON.stringify(decodePayload(done.flow.result))}`);
  worker.stop();
  if (waited.flow.status !== "FLOW_STATUS_COMPLETED" || done.flow.status !== "FLOW_STATUS_COMPLETED") process.exit(1);
}

main(process.argv[2] || "127.0.0.1:50051").catch((error) => {
  console.error(`demo failed: ${error.code ?? ""} ${error.details ?? error.message}`);
  process.exit(1);
});
