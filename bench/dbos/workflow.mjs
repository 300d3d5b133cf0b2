// The DBOS Transact side of saga's throughput benchmark (bench/README.md):
// a DBOS workflow of three steps, each inserting one row, run N times with C
// workflows in flight; prints completed workflows/s.
//
//   node bench/dbos/workflow.mjs --host /socket/dir --port 5432 --user postgres \
//       --app-db bench --system-db dbos_sys --workflows 2000 --concurrency 16
//
// The rows go to dbosbench.s1, s2, s3 in the application database (created
// here if missing, emptied before the timed run) through a node-postgres pool;
// DBOS keeps workflow state and step checkpoints in the system database,
// which DBOS.launch() creates and migrates if it does not exist.
// Progress goes to stderr; one line on stdout is the result:
//   DBOS_RESULT {"workflows": N, "seconds": ..., "workflows_per_second": ..., ...}
// Exit status 0 only when every workflow completed and each table has exactly
// N rows, one per workflow.
import { readFileSync } from 'node:fs';
import { parseArgs } from 'node:util';
import pg from 'pg';
import { DBOS } from '@dbos-inc/dbos-sdk';

const SDK_VERSION = JSON.parse(readFileSync(
  new URL('./node_modules/@dbos-inc/dbos-sdk/package.json', import.meta.url))).version;

const { values: opt } = parseArgs({
  options: {
    host: { type: 'string', default: process.env.PGHOST ?? '/var/run/postgresql' },
    port: { type: 'string', default: process.env.PGPORT ?? '5432' },
    user: { type: 'string', default: process.env.PGUSER ?? 'postgres' },
    'app-db': { type: 'string', default: 'bench' },
    'system-db': { type: 'string', default: 'dbos_sys' },
    workflows: { type: 'string', default: '2000' },
    concurrency: { type: 'string', default: '16' },
    warmup: { type: 'string', default: '50' },
    mode: { type: 'string', default: 'direct' },
    'pool-size': { type: 'string', default: '' },
  },
  strict: true,
});

const N = Number(opt.workflows);
const C = Number(opt.concurrency);
const WARMUP = Number(opt.warmup);
const port = Number(opt.port);
if (!(Number.isInteger(N) && N > 0 && Number.isInteger(C) && C > 0 && WARMUP >= 0 && port > 0)
    || !['direct', 'queue'].includes(opt.mode)) {
  console.error('usage: workflow.mjs [--host DIR] [--port N] [--user U] [--app-db DB] [--system-db DB]'
    + ' [--workflows N] [--concurrency C] [--warmup N] [--mode direct|queue] [--pool-size N]');
  process.exit(2);
}
// connections per pool (application database, DBOS's system database):
// enough for every workflow in flight to hold one of each, at most 20 each
// (the benchmark clusters have max_connections = 50)
const poolSize = opt['pool-size'] ? Number(opt['pool-size']) : Math.min(Math.max(10, C + 2), 20);
// workflow IDs are RUN-n (RUNw-n for the warm-up): the checks count the
// timed workflows' rows only, even should DBOS recover workflows that an
// earlier run left pending in the system database
const RUN = 'run' + Date.now().toString(36) + process.pid.toString(36);

function log(msg) {
  process.stderr.write(msg + '\n');
}

// connection URL for DBOS's system database; a socket directory goes in
// the host parameter, as libpq and node-postgres read it
function systemDatabaseUrl() {
  const u = new URL('postgresql://localhost/');
  u.username = opt.user;
  u.port = String(port);
  u.pathname = '/' + opt['system-db'];
  if (opt.host.startsWith('/')) {
    u.searchParams.set('host', opt.host);
  } else {
    u.hostname = opt.host;
  }
  return u.toString();
}

const app = new pg.Pool({
  host: opt.host, port, user: opt.user, database: opt['app-db'], max: poolSize,
});
app.on('error', (e) => log('dbos: application pool: ' + e.message));

await app.query(`
  CREATE SCHEMA IF NOT EXISTS dbosbench;
  CREATE TABLE IF NOT EXISTS dbosbench.s1 (id bigserial PRIMARY KEY, workflow text, note text);
  CREATE TABLE IF NOT EXISTS dbosbench.s2 (id bigserial PRIMARY KEY, workflow text, note text);
  CREATE TABLE IF NOT EXISTS dbosbench.s3 (id bigserial PRIMARY KEY, workflow text, note text);
`);

// ---- the workflow: three DBOS steps, each inserting one row

function insertStep(table, note) {
  return DBOS.registerStep(async function () {
    await app.query(`INSERT INTO dbosbench.${table} (workflow, note) VALUES ($1, $2)`,
      [DBOS.workflowID, note]);
  }, { name: 'insert_' + table });
}
const step1 = insertStep('s1', 'one');
const step2 = insertStep('s2', 'two');
const step3 = insertStep('s3', 'three');

const bench3 = DBOS.registerWorkflow(async function bench3(n) {
  await step1();
  await step2();
  await step3();
  return n;
}, { name: 'bench3' });

DBOS.setConfig({
  name: 'saga-bench',
  applicationVersion: 'bench-1',
  systemDatabaseUrl: systemDatabaseUrl(),
  systemDatabasePoolSize: poolSize,
  logLevel: 'warn',
});

// ---- two ways of starting many workflows

// direct: DBOS.startWorkflow in this process with C workflows in flight;
// each lane starts its next workflow when its previous one has returned
async function runDirect(count, tag) {
  let next = 0;
  let sum = 0;
  async function lane() {
    while (next < count) {
      const n = ++next;
      const handle = await DBOS.startWorkflow(bench3, { workflowID: `${tag}-${n}` })(n);
      const result = await handle.getResult();
      sum += result;
    }
  }
  await Promise.all(Array.from({ length: Math.min(C, count) }, lane));
  return sum;
}

// queue: every workflow enqueued on a DBOS queue with workerConcurrency C
// (this process dequeues and runs them), then each one's result awaited
let queue;
async function runQueue(count, tag) {
  const handles = [];
  for (let n = 1; n <= count; n++) {
    handles.push(await DBOS.startWorkflow(bench3, {
      workflowID: `${tag}-${n}`, queueName: queue.name,
    })(n));
  }
  let sum = 0;
  for (const h of handles) {
    const result = await h.getResult();
    sum += result;
  }
  return sum;
}

let status = 0;
try {
  await DBOS.launch();
  if (opt.mode === 'queue') {
    queue = await DBOS.registerQueue('bench3_queue', {
      workerConcurrency: C, minPollingIntervalMs: 100, onConflict: 'always_update',
    });
  }
  const run = opt.mode === 'queue' ? runQueue : runDirect;
  if (WARMUP > 0) {
    await run(WARMUP, RUN + 'w');
  }
  await app.query('TRUNCATE dbosbench.s1, dbosbench.s2, dbosbench.s3');
  log(`dbos: ${N} workflows (${opt.mode}, ${C} in flight, pools of ${poolSize} connections),`
    + ` @dbos-inc/dbos-sdk ${SDK_VERSION}, node ${process.version}`);

  const t0 = performance.now();
  const sum = await run(N, RUN);
  const seconds = (performance.now() - t0) / 1000;

  // rows of the timed workflows, and their distinct workflows in each table
  const { rows: [counts] } = await app.query(`
    SELECT count(*) FILTER (WHERE t = 1)::int AS s1,
           count(*) FILTER (WHERE t = 2)::int AS s2,
           count(*) FILTER (WHERE t = 3)::int AS s3,
           count(DISTINCT (t, workflow))::int AS distinct_rows
      FROM (SELECT 1 AS t, workflow FROM dbosbench.s1 UNION ALL
            SELECT 2, workflow FROM dbosbench.s2 UNION ALL
            SELECT 3, workflow FROM dbosbench.s3) r
     WHERE workflow LIKE $1`, [RUN + '-%']);
  const rows = counts.s1 + counts.s2 + counts.s3;
  const ok = sum === N * (N + 1) / 2 && counts.s1 === N && counts.s2 === N && counts.s3 === N
    && counts.distinct_rows === 3 * N;
  log(`dbos: ${N} workflows completed in ${seconds.toFixed(2)} s; rows: s1 ${counts.s1},`
    + ` s2 ${counts.s2}, s3 ${counts.s3} (${counts.distinct_rows} distinct workflow/table pairs)`);
  if (!ok) {
    log(`dbos: CHECK FAILED: expected ${N} workflow results and in each table ${N} rows,`
      + ' one per workflow');
    status = 1;
  }
  console.log('DBOS_RESULT ' + JSON.stringify({
    workflows: N, seconds: Number(seconds.toFixed(3)),
    workflows_per_second: Number((N / seconds).toFixed(1)), rows, ok,
    mode: opt.mode, concurrency: C, pool_size: poolSize, warmup: WARMUP,
    sdk: SDK_VERSION, node: process.version,
  }));
} catch (e) {
  log('dbos: ' + (e?.stack ?? e));
  status = 1;
} finally {
  await DBOS.shutdown().catch((e) => log('dbos: shutdown: ' + e.message));
  await app.end();
}
process.exit(status);
