// h2gen: an open-loop gRPC load generator on Node's built-in http2 (nghttp2 in C), no dependencies.
//
// Why not a Python client: one costs ~300 µs of CPU per call and cannot saturate a Python server on 2 cores.
// Why not h2load: it sends one fixed body, and Redeem on fresh codes needs a different request every call.
//
// It sends pre-encoded gRPC frames (5-byte prefix + serialized request, made by loadtest/frames.py) at a
// constant arrival rate, whatever the server does (open loop: a slow server builds a queue here and the queue
// shows in the latency, which is measured from each request's *scheduled* send time - no coordinated
// omission). Each frame is sent once, in file order.
//
// Modes: "unary" - one call per frame; "stream" - long-lived bidirectional calls, frames written round-robin
// over them and answers matched in order (one RedeemStream message per frame).
//
// Usage: node h2gen.mjs --target 127.0.0.1:50051 --path /redemption.v1.RedemptionService/Redeem
//          --frames FILE --rate 1000 --duration 5 [--connections 4] [--mode unary|stream] [--streams 8]
//          [--max-inflight 4000] [--warmup 1]
// Prints one JSON object: counts, grpc statuses, outcome counts (all calls, warm-up included), latency
// percentiles in ms (after the warm-up), generator CPU.
// Authentication like a real client: RGW_API_KEY in the environment (not argv, which `ps` shows) is sent as
// `authorization: Bearer <key>` on every call.
import http2 from "node:http2";
import fs from "node:fs";
import { performance } from "node:perf_hooks";

function parseArgs(argv) {
  const args = { connections: 4, mode: "unary", streams: 8, maxInflight: 4000, warmup: 1 };
  for (let i = 2; i < argv.length; i += 2) {
    const key = argv[i].replace(/^--/, "").replace(/-([a-z])/g, (_, c) => c.toUpperCase());
    args[key] = argv[i + 1];
  }
  for (const k of ["rate", "duration", "connections", "streams", "maxInflight", "warmup"]) args[k] = Number(args[k]);
  return args;
}

function readFrames(path) {
  const buf = fs.readFileSync(path);
  const frames = [];
  for (let off = 0; off + 5 <= buf.length; ) {
    const len = buf.readUInt32BE(off + 1);
    frames.push(buf.subarray(off, off + 5 + len));
    off += 5 + len;
  }
  return frames;
}

// The outcome of a RedeemResponse is field 1 (varint); a RedeemStreamResponse holds repeated results (field 2),
// each a RedeemStreamResult whose field 1 is a RedeemResponse. Only what the report needs is decoded.
function varint(buf, pos) {
  let value = 0, shift = 0, b;
  do { b = buf[pos++]; value += (b & 0x7f) * 2 ** shift; shift += 7; } while (b & 0x80);
  return [value, pos];
}

function fields(buf, onField) {
  for (let pos = 0; pos < buf.length; ) {
    let tag; [tag, pos] = varint(buf, pos);
    const num = Math.floor(tag / 8), type = tag & 7;
    if (type === 0) { let v; [v, pos] = varint(buf, pos); onField(num, v); }
    else if (type === 2) { let n; [n, pos] = varint(buf, pos); onField(num, buf.subarray(pos, pos + n)); pos += n; }
    else if (type === 1) pos += 8; else if (type === 5) pos += 4; else return;
  }
}

function countOutcomes(message, mode, outcomes) {
  if (mode === "unary") {
    let outcome = 0;
    fields(message, (n, v) => { if (n === 1 && typeof v === "number") outcome = v; });
    outcomes[outcome] = (outcomes[outcome] || 0) + 1;
    return;
  }
  fields(message, (n, result) => {
    if (n !== 2 || typeof result === "number") return;
    let outcome = "error";
    fields(result, (m, response) => {
      if (m === 1 && typeof response !== "number") {
        outcome = 0;
        fields(response, (k, v) => { if (k === 1 && typeof v === "number") outcome = v; });
      }
    });
    outcomes[outcome] = (outcomes[outcome] || 0) + 1;
  });
}

function* grpcMessages(state, chunk) {
  state.buf = state.buf.length ? Buffer.concat([state.buf, chunk]) : chunk;
  while (state.buf.length >= 5) {
    const len = state.buf.readUInt32BE(1);
    if (state.buf.length < 5 + len) return;
    yield state.buf.subarray(5, 5 + len);
    state.buf = state.buf.subarray(5 + len);
  }
}

const AUTHORIZATION = process.env.RGW_API_KEY ? { authorization: `Bearer ${process.env.RGW_API_KEY}` } : {};
const HEADERS = (path) => ({
  ":method": "POST", ":path": path, "content-type": "application/grpc", te: "trailers", ...AUTHORIZATION,
});

class Stats {
  constructor(startAt) { this.startAt = startAt; this.latencies = []; this.statuses = {}; this.outcomes = {};
    this.sent = 0; this.done = 0; this.skipped = 0; this.errors = 0; this.ok = 0; this.last = startAt; }
  finish(scheduled, status, counted) {
    this.done++;
    if (counted) { this.last = performance.now(); if (status === "0") this.ok++; }
    this.statuses[status] = (this.statuses[status] || 0) + 1;
    if (status !== "0") this.errors++;
    if (counted) this.latencies.push(performance.now() - scheduled);
  }
}

function unaryCall(session, path, frame, scheduled, stats, mode, counted) {
  const req = session.request(HEADERS(path));
  const state = { buf: Buffer.alloc(0) };
  let status = null;
  req.on("response", (h) => { if (h["grpc-status"] !== undefined) status = String(h["grpc-status"]); });
  req.on("trailers", (t) => { status = String(t["grpc-status"]); });
  req.on("data", (chunk) => { for (const m of grpcMessages(state, chunk)) countOutcomes(m, mode, stats.outcomes); });
  req.on("error", () => { if (status === null) status = "transport"; });
  req.on("close", () => { stats.finish(scheduled, status ?? "transport", counted); });
  req.end(frame);
}

function openStreams(sessions, path, count, stats) {
  const streams = [];
  for (let i = 0; i < count; i++) {
    const req = sessions[i % sessions.length].request(HEADERS(path));
    const s = { req, pending: [], state: { buf: Buffer.alloc(0) } };
    req.on("data", (chunk) => {
      for (const m of grpcMessages(s.state, chunk)) {
        const [scheduled, counted] = s.pending.shift();
        countOutcomes(m, "stream", stats.outcomes);
        stats.finish(scheduled, "0", counted);
      }
    });
    req.on("trailers", (t) => {
      const status = String(t["grpc-status"]);
      for (const [scheduled, counted] of s.pending.splice(0)) stats.finish(scheduled, status, counted);
    });
    req.on("error", () => { for (const [sch, c] of s.pending.splice(0)) stats.finish(sch, "transport", c); });
    streams.push(s);
  }
  return streams;
}

function percentile(sorted, p) {
  if (!sorted.length) return null;
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}

async function main() {
  const a = parseArgs(process.argv);
  const frames = readFrames(a.frames);
  const sessions = [];
  for (let i = 0; i < a.connections; i++) {
    const s = http2.connect(`http://${a.target}`, { settings: { initialWindowSize: 1 << 20 } });
    s.on("error", () => {});
    sessions.push(s);
  }
  await Promise.all(sessions.map((s) => new Promise((ok) => s.once("connect", ok))));
  const cpu0 = process.cpuUsage();
  const t0 = performance.now();
  const stats = new Stats(t0);
  const streams = a.mode === "stream" ? openStreams(sessions, a.path, a.streams, stats) : null;
  const total = Math.min(frames.length, Math.floor(a.rate * (a.duration + a.warmup)));
  const warmupSends = Math.floor(a.rate * a.warmup);
  let next = 0;
  await new Promise((resolve) => {
    const tick = () => {
      const now = performance.now();
      const due = Math.min(total, Math.floor(((now - t0) / 1000) * a.rate));
      while (next < due) {
        const scheduled = t0 + (next / a.rate) * 1000;
        const counted = next >= warmupSends;
        if (stats.sent - stats.done >= a.maxInflight) { stats.skipped++; next++; continue; }
        stats.sent++;
        if (streams) {
          const s = streams[next % streams.length];
          s.pending.push([scheduled, counted]);
          s.req.write(frames[next]);
        } else {
          unaryCall(sessions[next % sessions.length], a.path, frames[next], scheduled, stats, a.mode, counted);
        }
        next++;
      }
      if (next >= total) return resolve();
      // Sleep until the next send is due. Timers have ~1 ms resolution: sends due meanwhile go out together and
      // their latency still counts from their scheduled time (so this adds at most ~1 ms to what is measured).
      // Spinning instead would steal a core from the server under test.
      const wait = t0 + (next / a.rate) * 1000 - performance.now();
      setTimeout(tick, Math.max(1, Math.floor(wait)));
    };
    tick();
  });
  const sendEnd = performance.now();
  if (streams) for (const s of streams) s.req.end();
  const deadline = performance.now() + 30000;
  while (stats.done < stats.sent && performance.now() < deadline) await new Promise((r) => setTimeout(r, 5));
  const elapsed = (performance.now() - t0) / 1000;
  const cpu = process.cpuUsage(cpu0);
  for (const s of sessions) s.close();
  const lat = Float64Array.from(stats.latencies).sort();
  // Throughput: successful measured calls over the time from the end of the warm-up to the last of them.
  const measuredSeconds = (stats.last - t0) / 1000 - a.warmup;
  process.stdout.write(JSON.stringify({
    mode: a.mode, offered_rate: a.rate, duration_s: a.duration, sent: stats.sent, completed: stats.done,
    skipped_inflight_cap: stats.skipped, unfinished: stats.sent - stats.done, errors: stats.errors,
    statuses: stats.statuses, outcomes: stats.outcomes, measured: lat.length,
    achieved_rate: stats.ok / Math.max(measuredSeconds, 1e-9), send_window_s: (sendEnd - t0) / 1000, elapsed_s: elapsed,
    latency_ms: { p50: percentile(lat, 50), p90: percentile(lat, 90), p99: percentile(lat, 99),
      p999: percentile(lat, 99.9), max: lat.length ? lat[lat.length - 1] : null },
    generator_cpu_s: (cpu.user + cpu.system) / 1e6,
  }) + "\n");
}

main().catch((e) => { console.error(e); process.exit(1); });
