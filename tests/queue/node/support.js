// Starts and stops the real `ferry` binary for the Node suites ($FERRY_BIN, default
// $CARGO_TARGET_DIR/debug/ferry or ../../../target/debug/ferry): ports 0, a temporary data
// directory, addresses read from its `ferry: <what> listening on <addr>` lines, stopped by its PID.
'use strict';

const { spawn, execFileSync } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');

function ferryBin() {
  if (process.env.FERRY_BIN) return process.env.FERRY_BIN;
  const target = process.env.CARGO_TARGET_DIR || path.join(__dirname, '..', '..', '..', 'target');
  return path.join(target, 'debug', 'ferry');
}

function unique(kind) {
  return `${kind}-${Math.random().toString(16).slice(2, 14)}`;
}

// `extraArgs` go to `ferry serve`; it is ready once it printed the addresses named in `want`
// (all of them are in `addresses`, by name: mqtt, mqtt-ws, queue, ...).
async function startFerry(extraArgs = [], want = ['queue']) {
  const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-node-'));
  const proc = spawn(ferryBin(), ['serve', '--listen', '127.0.0.1:0', '--api-listen', '127.0.0.1:0',
    '--queue-listen', '127.0.0.1:0', '--data-dir', path.join(dataDir, 'data'), '--log-level', 'warn',
    ...extraArgs],
  { stdio: ['ignore', 'pipe', 'inherit'] });
  const addresses = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`ferry did not print ${want.join(', ')}`)), 30000);
    let buf = '';
    const found = {};
    proc.stdout.on('data', (chunk) => {
      buf += chunk.toString();
      for (const m of buf.matchAll(/ferry: ([\w-]+) listening on (\S+)/g)) found[m[1]] = m[2];
      if (want.every((w) => found[w])) { clearTimeout(timer); resolve(found); }
    });
    proc.on('exit', (code) => reject(new Error(`ferry exited with ${code}`)));
  });
  return {
    proc,
    dataDir,
    addresses,
    endpoint: addresses.queue,
    mqtt: addresses.mqtt,
    // `ferry ctl` against this server; throws with its message on failure.
    ctl(...args) {
      return execFileSync(ferryBin(), ['ctl', '--data-dir', path.join(dataDir, 'data'), ...args],
        { encoding: 'utf8', timeout: 15000, stdio: ['ignore', 'pipe', 'pipe'] });
    },
    async stop() {
      if (proc.exitCode === null) {
        const exited = new Promise((r) => proc.once('exit', r));
        process.kill(proc.pid, 'SIGTERM');
        const timer = setTimeout(() => process.kill(proc.pid, 'SIGKILL'), 10000);
        await exited;
        clearTimeout(timer);
      }
      fs.rmSync(dataDir, { recursive: true, force: true });
    },
  };
}

module.exports = { ferryBin, unique, startFerry };
