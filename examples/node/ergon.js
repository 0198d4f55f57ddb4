// A small Ergon client for Node.js, loading the contract straight from protos/ergon/v1.
"use strict";

const path = require("node:path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTOS = path.resolve(__dirname, "..", "..", "protos");

function loadErgon() {
  const definition = protoLoader.loadSync(
    ["ergon/v1/scheduler.proto", "ergon/v1/signal.proto", "ergon/v1/worker.proto"],
    { includeDirs: [PROTOS], keepCase: true, longs: String, enums: String, defaults: true, oneofs: true },
  );
  return grpc.loadPackageDefinition(definition).ergon.v1;
}

const ergon = loadErgon();

function clients(address) {
  const credentials = grpc.credentials.createInsecure();
  return {
    scheduler: new ergon.SchedulerService(address, credentials),
    signals: new ergon.SignalService(address, credentials),
    workers: new ergon.WorkerService(address, credentials),
  };
}

// Promise wrapper for unary calls; errors carry the gRPC code and Ergon's reason.
function call(client, method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, (error, response) => (error ? reject(error) : resolve(response)));
  });
}

// JSON payloads the way the Python SDK writes them (encoding json/plain, bytes in `data`).
function jsonPayload(value) {
  return { encoding: "json/plain", data: Buffer.from(JSON.stringify(value)) };
}

function decodePayload(payload) {
  if (!payload || !payload.body) return null;
  if (payload.body === "data") {
    if (payload.encoding === "binary/null") return null;
    return JSON.parse(Buffer.from(payload.data).toString("utf8"));
  }
  return fromValue(payload.json);
}

// google.protobuf.Value (inline JSON) into a plain JS value.
function fromValue(value) {
  switch (value.kind) {
    case "null_value": return null;
    case "number_value": return value.number_value;
    case "string_value": return value.string_value;
    case "bool_value": return value.bool_value;
    case "struct_value":
      return Object.fromEntries(Object.entries(value.struct_value.fields).map(([k, v]) => [k, fromValue(v)]));
    case "list_value": return value.list_value.values.map(fromValue);
    default: return null;
  }
}

module.exports = { ergon, clients, call, jsonPayload, decodePayload };
