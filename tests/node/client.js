#!/usr/bin/env node
// A memoryd client built from proto/memoryd/v1/memory.proto alone (no Python
// code, no generated stubs): tests/test_node_client.py runs it against a
// daemon and checks its output against LocalMemory on the same data.
//
//   node tests/node/client.js ADDRESS DIR
//
// DIR holds params.json ({bank, dim, value_dim, rows, nq, k, client_name,
// quota_bank}) and keys.bin, values.bin, queries.bin: little-endian float32,
// C order. The client creates the bank, adds the rows in two messages of
// one Add stream, searches (a streamed reply on DEFAULT channel options, so
// gRPC's 4 MiB receive limit applies), decodes the tensors by the rules of
// memory.proto and prints one JSON object on stdout. It also makes two calls
// that fail and reports their status codes and google.rpc details (read
// from the grpc-status-details-bin trailer).
'use strict';

const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const PROTO = path.join(__dirname, '..', '..', 'proto', 'memoryd', 'v1', 'memory.proto');
const DEADLINE_MS = 60000;

// The google.rpc messages the daemon puts in the trailer, wire-compatible
// with google/rpc/status.proto and error_details.proto (only what is read).
const RPC = protobuf.parse(`
  syntax = "proto3";
  package google.rpc;
  message Any { string type_url = 1; bytes value = 2; }
  message Status { int32 code = 1; string message = 2; repeated Any details = 3; }
  message ErrorInfo { string reason = 1; string domain = 2; map<string, string> metadata = 3; }
  message QuotaFailure {
    message Violation { string subject = 1; string description = 2; }
    repeated Violation violations = 1;
  }
`, { keepCase: true }).root;

const ITEMSIZE = { FLOAT32: 4, FLOAT16: 2, BFLOAT16: 2, INT64: 8, INT32: 4 };

// Tensor -> flat array of JS numbers (little-endian, C order, per memory.proto).
function decode(t) {
  const shape = t.shape.map(Number);
  const n = shape.reduce((a, b) => a * b, 1);
  const size = ITEMSIZE[t.dtype];
  if (size === undefined || t.data.length !== n * size) {
    throw new Error(`bad tensor ${t.dtype} ${JSON.stringify(shape)}: ${t.data.length} bytes`);
  }
  const view = new DataView(t.data.buffer, t.data.byteOffset, t.data.byteLength);
  const out = new Array(n);
  for (let i = 0; i < n; i++) {
    switch (t.dtype) {
      case 'FLOAT32': out[i] = view.getFloat32(4 * i, true); break;
      case 'INT64': out[i] = Number(view.getBigInt64(8 * i, true)); break;
      case 'INT32': out[i] = view.getInt32(4 * i, true); break;
      case 'BFLOAT16': {  // the upper 16 bits of a binary32
        const w = new DataView(new ArrayBuffer(4));
        w.setUint32(0, view.getUint16(2 * i, true) << 16, true);
        out[i] = w.getFloat32(0, true);
        break;
      }
      default: throw new Error(`dtype ${t.dtype} not decoded here`);
    }
  }
  return { shape, values: out };
}

function append(target, items) {
  for (const x of items) target.push(x);
}

function float32Tensor(buf, rows, cols) {
  return { dtype: 'FLOAT32', shape: [rows, cols], data: buf };
}

// The status code, message and google.rpc details of a failed call.
function describeError(err) {
  const out = { code: err.code, code_name: grpc.status[err.code], details: err.details };
  const raw = err.metadata ? err.metadata.get('grpc-status-details-bin') : [];
  if (raw.length) {
    const status = RPC.lookupType('google.rpc.Status').decode(raw[0]);
    out.status_code = status.code;
    out.status_message = status.message;
    out.detail_types = status.details.map((d) => d.type_url);
    for (const d of status.details) {
      if (d.type_url === 'type.googleapis.com/google.rpc.ErrorInfo') {
        const info = RPC.lookupType('google.rpc.ErrorInfo').decode(d.value);
        out.error_info = { reason: info.reason, domain: info.domain, metadata: info.metadata };
      } else if (d.type_url === 'type.googleapis.com/google.rpc.QuotaFailure') {
        const q = RPC.lookupType('google.rpc.QuotaFailure').decode(d.value);
        out.quota_violations = q.violations.map((v) => ({ subject: v.subject, description: v.description }));
      }
    }
  }
  return out;
}

function deadline() {
  return { deadline: Date.now() + DEADLINE_MS };
}

function unary(client, method, request, metadata) {
  return new Promise((resolve, reject) => {
    client[method](request, metadata, deadline(), (err, reply) => (err ? reject(err) : resolve(reply)));
  });
}

// A client-streaming write: the messages in order, then the reply.
function writeStream(client, method, messages, metadata) {
  return new Promise((resolve, reject) => {
    const call = client[method](metadata, deadline(), (err, reply) => (err ? reject(err) : resolve(reply)));
    for (const m of messages) call.write(m);
    call.end();
  });
}

// A server-streaming call through the service definition, recording each
// message's serialized size: [{message, bytes}].
function serverStream(client, def, request, metadata) {
  return new Promise((resolve, reject) => {
    const sizes = [];
    const messages = [];
    const call = client.makeServerStreamRequest(
      def.path, def.requestSerialize,
      (buf) => { sizes.push(buf.length); return def.responseDeserialize(buf); },
      request, metadata, deadline());
    call.on('data', (m) => messages.push(m));
    call.on('error', reject);
    call.on('end', () => resolve(messages.map((m, i) => ({ message: m, bytes: sizes[i] }))));
  });
}

async function main() {
  const [address, dir] = process.argv.slice(2);
  if (!address || !dir) throw new Error('usage: node client.js ADDRESS DIR');
  const p = JSON.parse(fs.readFileSync(path.join(dir, 'params.json'), 'utf8'));
  const keys = fs.readFileSync(path.join(dir, 'keys.bin'));
  const values = fs.readFileSync(path.join(dir, 'values.bin'));
  const queries = fs.readFileSync(path.join(dir, 'queries.bin'));

  const definition = protoLoader.loadSync(PROTO, {
    keepCase: true, longs: String, enums: String, defaults: true, oneofs: true,
  });
  const Memory = grpc.loadPackageDefinition(definition).memoryd.v1.Memory;
  const client = new Memory(address, grpc.credentials.createInsecure());   // default options
  const md = new grpc.Metadata();
  md.set('x-memoryd-client', p.client_name);
  const out = {};

  try {
    const info = await unary(client, 'CreateBank', { spec: {
      name: p.bank, dim: p.dim, value_dim: p.value_dim, value_dtype: 'FLOAT32', metric: 'L2',
      quota_bytes: -1 } }, md);
    out.bank = { name: info.spec.name, dim: info.spec.dim, value_dim: info.spec.value_dim,
      value_dtype: info.spec.value_dtype, metric: info.spec.metric, kind: info.spec.kind,
      index: info.spec.index, quota_bytes: info.spec.quota_bytes, count: info.count };

    // Add: two messages; the first names the bank, the second leaves it empty.
    const half = Math.floor(p.rows / 2);
    const kRow = 4 * p.dim;
    const vRow = 4 * p.value_dim;
    const added = await writeStream(client, 'Add', [
      { bank: p.bank, keys: float32Tensor(keys.subarray(0, half * kRow), half, p.dim),
        values: float32Tensor(values.subarray(0, half * vRow), half, p.value_dim) },
      { bank: '', keys: float32Tensor(keys.subarray(half * kRow), p.rows - half, p.dim),
        values: float32Tensor(values.subarray(half * vRow), p.rows - half, p.value_dim) },
    ], md);
    const ids = decode(added.ids);
    out.add = { dtype: added.ids.dtype, shape: ids.shape, ids_first: ids.values[0],
      ids_last: ids.values[ids.values.length - 1],
      consecutive: ids.values.every((v, i) => v === i) };

    const def = definition['memoryd.v1.Memory'].Search;
    const replies = await serverStream(client, def, {
      banks: [p.bank], queries: float32Tensor(queries, p.nq, p.dim), k: p.k, values: true,
    }, md);
    const search = { messages: replies.length, offsets: [], bytes: [], rows: [], dtypes: [],
      ids: [], scores: [], bank: [], values_rows: {} };
    for (const { message: m, bytes } of replies) {
      const offset = Number(m.offset);
      const rows = Number(m.ids.shape[0]);
      search.offsets.push(offset);
      search.bytes.push(bytes);
      search.rows.push(rows);
      search.dtypes.push([m.ids.dtype, m.scores.dtype, m.bank.dtype, m.values.dtype]);
      append(search.ids, decode(m.ids).values);
      append(search.scores, decode(m.scores).values);
      append(search.bank, decode(m.bank).values);
      const v = decode(m.values);                  // (rows, k, value_dim): keep each block's first row
      search.values_shape = v.shape.slice(1);
      search.values_rows[offset] = v.values.slice(0, p.k * p.value_dim);
    }
    out.search = search;

    // Two calls that fail: a search of a bank that does not exist (NOT_FOUND,
    // on a server stream) and an Add over a quota (RESOURCE_EXHAUSTED).
    out.errors = [];
    try {
      await serverStream(client, def, { banks: ['no-such-bank'],
        queries: float32Tensor(queries.subarray(0, kRow), 1, p.dim), k: 1 }, md);
      out.errors.push({ call: 'Search', code: 0 });
    } catch (err) {
      out.errors.push({ call: 'Search', ...describeError(err) });
    }
    await unary(client, 'CreateBank', { spec: { name: p.quota_bank, dim: p.dim, quota_bytes: 1000 } }, md);
    try {
      await writeStream(client, 'Add', [{ bank: p.quota_bank,
        keys: float32Tensor(keys.subarray(0, 100 * kRow), 100, p.dim) }], md);
      out.errors.push({ call: 'Add', code: 0 });
    } catch (err) {
      out.errors.push({ call: 'Add', ...describeError(err) });
    }
  } finally {
    client.close();
  }
  process.stdout.write(JSON.stringify(out));
}

main().catch((err) => {
  process.stderr.write(`client.js failed: ${err.stack || err}\n`);
  if (err.code !== undefined) process.stderr.write(`status ${err.code}: ${err.details}\n`);
  process.exit(1);
});
