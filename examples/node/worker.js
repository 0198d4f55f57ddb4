// An Ergon worker written in Node.js: it runs the flow type "NodeGreeter" over the
// WorkerService.Connect stream, with journal replay: a recorded step is never run again.
"use strict";

const { clients, decodePayload, jsonPayload } = require("./ergon");

const FLOW_TYPE = "NodeGreeter";

// The flow: two steps, each recorded durably before the flow moves on.
async function greeterFlow(input, ctx) {
  const greeting = await ctx.step("greet", async () => `Hello, ${input.name}!`);
  const shouted = await ctx.step("shout", async () => greeting.toUpperCase());
  return { greeting, shouted, language: "javascript" };
}

function startWorker(address, workerId, { capacity = 10, onReady } = {}) {
  const { workers } = clients(address);
  const stream = workers.Connect();
  let seq = 0;
  const pending = new Map(); // seq -> resolve/reject of the event's ack
  let heartbeat = null;

  function send(event, wantAck = true) {
    const mine = wantAck ? ++seq : 0;
    stream.write({ events: [{ seq: mine, ...event }] });
    if (!wantAck) return Promise.resolve();
    return new Promise((resolve, reject) => pending.set(mine, { resolve, reject }));
  }

  async function run(assignment) {
    const journal = new Map(assignment.journal.map((entry) => [entry.key, entry]));
    const counters = new Map();
    const lease = { flow_id: assignment.flow_id, lease_token: assignment.lease_token };
    const ctx = {
      async step(name, body) {
        const count = (counters.get(name) || 0) + 1;
        counters.set(name, count);
        const key = `${name}#${count}`;
        const recorded = journal.get(key);
        if (recorded && recorded.status === "ENTRY_STATUS_COMPLETED") return decodePayload(recorded.result);
        const value = await body();
        await send({ step_result: { ...lease, key, attempts: 1, kind: "ENTRY_KIND_STEP", result: jsonPayload(value) } });
        return value;
      },
    };
    try {
      const result = await greeterFlow(decodePayload(assignment.input) || {}, ctx);
      await send({ flow_completed: { ...lease, result: jsonPayload(result) } });
    } catch (error) {
      const failure = { type: error.name || "Error", message: String(error.message || error) };
      await send({ flow_failed: { ...lease, failure } }).catch(() => {});
    }
  }

  stream.on("data", (response) => {
    for (const event of response.events) {
      if (event.registered) {
        heartbeat = setInterval(() => send({ heartbeat: {} }, false), Number(event.registered.heartbeat_interval_ms));
        if (onReady) onReady();
      } else if (event.ack) {
        const waiter = pending.get(Number(event.ack.seq));
        pending.delete(Number(event.ack.seq));
        if (waiter) (event.ack.code === 0 ? waiter.resolve() : waiter.reject(new Error(`${event.ack.reason}: ${event.ack.message}`)));
      } else if (event.assignment) {
        run(event.assignment);
      }
    }
  });
  stream.on("error", (error) => {
    if (error.code !== 1) console.error(`worker stream failed: ${error.message}`); // 1: CANCELLED by us
  });
  send({ register: { worker_id: workerId, flow_types: [FLOW_TYPE], capacity, protocol_version: 1 } }, false);
  return {
    stop() {
      clearInterval(heartbeat);
      stream.cancel();
    },
  };
}

module.exports = { startWorker, FLOW_TYPE };

if (require.main === module) {
  const address = process.argv[2] || "127.0.0.1:50051";
  const worker = startWorker(address, "node-worker", { onReady: () => console.log(`node worker ready on ${address}`) });
  process.on("SIGTERM", () => { worker.stop(); process.exit(0); });
  process.on("SIGINT", () => { worker.stop(); process.exit(0); });
}
