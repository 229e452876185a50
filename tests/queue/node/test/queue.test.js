// Ferry's embedded queue with the official RocketMQ 5 Node.js SDK (rocketmq-client-nodejs 1.0.x)
// against the real `ferry` binary ($FERRY_BIN, default ../../../target/debug/ferry). Run with
// `node --test` from this directory. Every wait is bounded; the server is stopped by its PID.
'use strict';

const { test, before, after } = require('node:test');
const assert = require('node:assert');
const { Producer, SimpleConsumer, PushConsumer, ConsumeResult } = require('rocketmq-client-nodejs');
const { unique, startFerry } = require('../support');

const WAIT_MS = 15000;
const quiet = { info() {}, warn() {}, error() {}, debug() {}, trace() {} };
let server;
let endpoint;

before(async () => {
  server = await startFerry();
  endpoint = server.endpoint;
});

after(async () => {
  if (server) await server.stop();
  // The SDK leaves gRPC channels and timers behind after shutdown(); do not let them keep this
  // test process alive once every test has finished.
  setTimeout(() => process.exit(), 200).unref();
});

async function receiveUntil(consumer, count) {
  const got = [];
  const deadline = Date.now() + WAIT_MS;
  while (got.length < count && Date.now() < deadline) {
    got.push(...await consumer.receive(16, 10000));
  }
  return got;
}

test('producer and simple consumer round trip', async () => {
  const topic = unique('t');
  const consumer = new SimpleConsumer({
    endpoints: endpoint, consumerGroup: unique('g'), logger: quiet, awaitDuration: 1000,
    subscriptions: new Map().set(topic, 'a||b'),
  });
  const producer = new Producer({ endpoints: endpoint, logger: quiet });
  await consumer.startup();
  await producer.startup();
  try {
    const receipt = await producer.send({
      topic, tag: 'a', keys: ['k1'], properties: new Map([['color', 'blue']]),
      body: Buffer.from('hello from node'),
    });
    assert.ok(receipt.messageId);
    await producer.send({ topic, tag: 'c', body: Buffer.from('filtered out') });
    const got = await receiveUntil(consumer, 1);
    assert.strictEqual(got.length, 1);
    const m = got[0];
    assert.strictEqual(m.body.toString(), 'hello from node');
    assert.strictEqual(m.tag, 'a');
    assert.deepStrictEqual(m.keys, ['k1']);
    assert.strictEqual(m.properties.get('color'), 'blue');
    assert.strictEqual(m.messageId, receipt.messageId);
    await consumer.ack(m);
    assert.deepStrictEqual(await consumer.receive(16, 10000), []);
  } finally {
    await producer.shutdown();
    await consumer.shutdown();
  }
});

test('push consumer receives with a listener', async () => {
  const topic = unique('t');
  const seen = [];
  let done;
  const all = new Promise((r) => { done = r; });
  const consumer = new PushConsumer({
    endpoints: endpoint, consumerGroup: unique('g'), logger: quiet,
    subscriptions: new Map([[topic, '*']]),
    messageListener: {
      async consume(mv) {
        seen.push(mv.body.toString());
        if (new Set(seen).size === 3) done();
        return ConsumeResult.SUCCESS;
      },
    },
  });
  const producer = new Producer({ endpoints: endpoint, logger: quiet });
  await consumer.startup();
  await producer.startup();
  try {
    const t0 = Date.now();
    for (let i = 0; i < 3; i++) {
      await producer.send({ topic, body: Buffer.from(`push-${i}`) });
    }
    let timer;
    await Promise.race([all, new Promise((_, rej) => {
      timer = setTimeout(() => rej(new Error(`only got ${JSON.stringify(seen)}`)), WAIT_MS);
    })]);
    clearTimeout(timer);
    console.log(`# push consumer got all 3 after ${Date.now() - t0} ms`);
    assert.deepStrictEqual([...new Set(seen)].sort(), ['push-0', 'push-1', 'push-2']);
  } finally {
    await producer.shutdown();
    await consumer.shutdown();
  }
});
