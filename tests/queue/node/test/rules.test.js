// Rules with the official RocketMQ 5 Node.js SDK on the queue side and Debian's
// mosquitto_pub / mosquitto_sub on the MQTT side, against the real `ferry` binary: the inflow and
// status walk-throughs of the product. Every wait is bounded; the server is stopped by its PID.
'use strict';

const { test, before, after } = require('node:test');
const assert = require('node:assert');
const { spawn, execFileSync } = require('node:child_process');
const { Producer, PushConsumer, ConsumeResult } = require('rocketmq-client-nodejs');
const { unique, startFerry } = require('../support');

const WAIT_MS = 15000;
const quiet = { info() {}, warn() {}, error() {}, debug() {}, trace() {} };
let server;

before(async () => {
  server = await startFerry();
});

after(async () => {
  if (server) await server.stop();
  setTimeout(() => process.exit(), 200).unref();
});

function mqttArgs() {
  const [host, port] = server.mqtt.split(':');
  return ['-h', host, '-p', port, '-V', 'mqttv311'];
}

function withTimeout(promise, what) {
  let timer;
  return Promise.race([promise, new Promise((_, rej) => {
    timer = setTimeout(() => rej(new Error(`timed out waiting for ${what}`)), WAIT_MS);
  })]).finally(() => clearTimeout(timer));
}

test('inflow: a Node producer reaches an MQTT subscriber through the rule', async () => {
  const queueTopic = unique('TopicA');
  const parent = unique('TopicB');
  server.ctl('rules', 'create', unique('in'), '--type', 'inflow', '--source', queueTopic,
    '--target', parent);
  // One message, then exit; -W bounds the wait.
  const sub = spawn('mosquitto_sub', [...mqttArgs(), '-t', `${parent}/#`, '-q', '1', '-C', '1',
    '-W', '15', '-v'], { stdio: ['ignore', 'pipe', 'inherit'] });
  let out = '';
  sub.stdout.on('data', (c) => { out += c.toString(); });
  const exited = new Promise((r) => sub.once('exit', r));
  await new Promise((r) => setTimeout(r, 500)); // let it subscribe
  const producer = new Producer({ endpoints: server.endpoint, logger: quiet });
  await producer.startup();
  try {
    await producer.send({
      topic: queueTopic, tag: 'MQ2MQTT', properties: new Map([['mqttSecondTopic', '/testMq4Iot']]),
      body: Buffer.from('hello device'),
    });
    const code = await withTimeout(exited, 'mosquitto_sub');
    assert.strictEqual(code, 0, `mosquitto_sub exited with ${code}`);
    assert.strictEqual(out.trim(), `${parent}/testMq4Iot hello device`);
  } finally {
    if (sub.exitCode === null) sub.kill();
    await producer.shutdown();
  }
});

test('status: a push consumer with connect||tcpclean sees a client come and go', async () => {
  const group = `GID_${unique('n').replace('-', '_')}`;
  const statusTopic = unique('Status');
  server.ctl('groups', 'create', group);
  server.ctl('rules', 'create', unique('st'), '--type', 'status', '--source', group,
    '--target', statusTopic);
  const seen = [];
  let wake;
  let waiting = new Promise((r) => { wake = r; });
  const consumer = new PushConsumer({
    endpoints: server.endpoint, consumerGroup: unique('g'), logger: quiet,
    subscriptions: new Map([[statusTopic, 'connect||tcpclean']]),
    messageListener: {
      async consume(mv) {
        seen.push({ tag: mv.tag, body: JSON.parse(mv.body.toString()) });
        wake();
        return ConsumeResult.SUCCESS;
      },
    },
  });
  await consumer.startup();
  try {
    await new Promise((r) => setTimeout(r, 1000)); // the group exists from here on
    const clientId = `${group}@@@dev1`;
    execFileSync('mosquitto_pub', [...mqttArgs(), '-i', clientId, '-t', 'x', '-m', 'y'],
      { timeout: 15000 });
    const deadline = Date.now() + WAIT_MS;
    while (seen.length < 2 && Date.now() < deadline) {
      await withTimeout(waiting, 'status events').catch(() => {});
      waiting = new Promise((r) => { wake = r; });
    }
    assert.deepStrictEqual(seen.map((e) => e.tag), ['connect', 'tcpclean'], JSON.stringify(seen));
    assert.strictEqual(seen[0].body.channelId, seen[1].body.channelId);
    assert.match(seen[0].body.channelId, /^[0-9a-f]{32}$/);
    assert.strictEqual(seen[0].body.clientId, clientId);
    assert.strictEqual(seen[1].body.eventType, 'tcpclean');
  } finally {
    await consumer.shutdown();
  }
});
