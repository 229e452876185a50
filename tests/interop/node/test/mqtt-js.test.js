// MQTT.js (npm `mqtt`, the client browsers use) against the real `ferry` binary over TCP,
// WebSocket and WebSocket over TLS ($FERRY_BIN, default $CARGO_TARGET_DIR/debug/ferry), started
// and stopped (by its PID) as the queue's Node suite does. Ferry's WSS listener uses the
// self-signed certificate it makes when none is configured, so the WSS client skips
// verification. Every wait is bounded.
'use strict';

const test = require('node:test');
const assert = require('node:assert/strict');
const mqtt = require('mqtt');

const WAIT_MS = 10000;

// The queue suite's launcher (the same `ferry serve`, with the WebSocket listeners added).
const { startFerry: launch } = require('../../../queue/node/support.js');

async function startFerry() {
  const ferry = await launch(['--ws-listen', '127.0.0.1:0', '--wss-listen', '127.0.0.1:0'],
    ['mqtt', 'mqtt-ws', 'mqtt-wss']);
  const a = ferry.addresses;
  ferry.urls = { tcp: `mqtt://${a.mqtt}`, ws: `ws://${a['mqtt-ws']}/mqtt`, wss: `wss://${a['mqtt-wss']}/mqtt` };
  return ferry;
}

function within(ms, promise, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: nothing within ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

async function connect(url, protocolVersion) {
  const client = mqtt.connect(url, {
    protocolVersion,
    clientId: `mqttjs-${Math.random().toString(16).slice(2, 12)}`,
    reconnectPeriod: 0,
    connectTimeout: WAIT_MS,
    rejectUnauthorized: false,
  });
  await within(WAIT_MS, new Promise((resolve, reject) => {
    client.once('connect', resolve);
    client.once('error', reject);
  }), `connect to ${url}`);
  return client;
}

for (const protocolVersion of [4, 5]) {
  test(`MQTT.js v${protocolVersion === 4 ? '3.1.1' : '5'} over TCP, WebSocket and WSS`, async () => {
    const ferry = await startFerry();
    const clients = [];
    try {
      for (const url of Object.values(ferry.urls)) clients.push(await connect(url, protocolVersion));
      const topic = `mqttjs/${Math.random().toString(16).slice(2, 12)}`;
      const received = clients.map((c) => {
        const got = [];
        c.on('message', (t, payload) => got.push([t, payload.toString('hex')]));
        return got;
      });
      for (const c of clients) await c.subscribeAsync(`${topic}/#`, { qos: 1 });
      const big = Buffer.alloc(100000, 0xab); // more than one WebSocket frame's 16-bit length
      const names = Object.keys(ferry.urls);
      for (const [i, c] of clients.entries()) {
        await c.publishAsync(`${topic}/${names[i]}`, i === 1 ? big : Buffer.from(names[i]), { qos: 1 });
      }
      const want = names.map((n, i) => [`${topic}/${n}`, (i === 1 ? big : Buffer.from(n)).toString('hex')]);
      await within(WAIT_MS, (async () => {
        while (received.some((got) => got.length < want.length)) {
          await new Promise((r) => setTimeout(r, 20));
        }
      })(), 'every message to every client');
      for (const got of received) {
        assert.deepEqual([...got].sort(), [...want].sort());
      }
    } finally {
      for (const c of clients) await c.endAsync();
      await ferry.stop();
    }
  });
}
