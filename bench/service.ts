/**
 * bench/service: `kiln serve` beside the CLI doing the same work, on a real multi-layer image pushed
 * to a loopback registry, measured in the same run:
 *   - GET /images/{ref} requests/s (keep-alive, a few requests in flight) beside `kiln --json inspect`
 *     calls/s (one process per call);
 *   - POST /images → `ready`, uncached (fresh store) beside `kiln pull REF --format ext4`;
 *   - POST → `ready` with the image already in the store (pulled by `kiln pull`), artifact not built,
 *     beside `kiln export` of a stored image;
 *   - POST of an image already `ready` (answered 200 at once) beside `kiln export` with the artifact
 *     cached.
 * The CLI, like the service, builds into the store's cache (no -o), so both do the same work.
 * Service times exclude its start (it is long-running); CLI times include process start.
 *
 *   bench/service            (needs `scripts/setup.sh --test` and a built dist/)
 *   BENCH_RUNS=5 bench/service
 */
import { spawnSync } from "node:child_process";
import { rmSync, statSync } from "node:fs";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { Pool } from "undici";
import { BIN, childEnv, REPO_ROOT } from "../test/cli/kiln.js";
import { makeTempDir, removeDir, run } from "../test/helpers/exec.js";
import { buildImage, pushImage } from "../test/helpers/images.js";
import { startRegistry } from "../test/helpers/registry.js";
import { startService } from "../test/server/service.js";

const RUNS = Number(process.env.BENCH_RUNS ?? 3);
/** GET requests per run, and how many are in flight at once (one keep-alive connection each). */
const GETS = 2000;
const IN_FLIGHT = 16;
/** CLI `inspect` calls and cached POSTs per run. */
const INSPECTS = 10;
const CACHED_POSTS = 20;
const FORMAT = "ext4";

/** Layers made from real files of this machine (as bench/pull), so sizes and ratios are realistic. */
const SOURCES: [string, string[]][] = [
  ["/", ["etc"]],
  ["/", ["usr/lib/python3.11"]],
  ["/", ["usr/bin"]],
  ["/", ["usr/share/perl", "usr/share/zoneinfo", "usr/share/mime"]],
];

interface ImageRecord {
  status: string;
  artifact: string | null;
  error: { code: string; message: string } | null;
}

const seconds = (t0: bigint) => Number(process.hrtime.bigint() - t0) / 1e9;
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

/** Wall time of one CLI call, process start included; the same environment as the service's. */
function time(args: string[], env: NodeJS.ProcessEnv): number {
  const t0 = process.hrtime.bigint();
  const r = spawnSync(BIN, args, {
    cwd: REPO_ROOT,
    env,
    stdio: ["ignore", "ignore", "pipe"],
  });
  const t = seconds(t0);
  if (r.status !== 0) throw new Error(`kiln ${args.join(" ")} failed: ${r.stderr.toString().trim()}`);
  return t;
}

async function call(pool: Pool, method: string, path: string, body?: unknown) {
  const res = await pool.request({
    method: method as "GET" | "POST",
    path,
    headers: body === undefined ? {} : { "content-type": "application/json" },
    body: body === undefined ? null : JSON.stringify(body),
  });
  const text = await res.body.text();
  if (res.statusCode >= 300) throw new Error(`${method} ${path}: ${res.statusCode} ${text}`);
  return { status: res.statusCode, record: JSON.parse(text) as ImageRecord };
}

/** POST the image, then poll its record every millisecond until it is ready; seconds from the POST. */
async function postUntilReady(pool: Pool, ref: string): Promise<number> {
  const path = `/images/${encodeURIComponent(ref)}?format=${FORMAT}`;
  const t0 = process.hrtime.bigint();
  let { record } = await call(pool, "POST", "/images", { name: ref, format: FORMAT });
  while (record.status !== "ready") {
    if (record.status === "failed") throw new Error(`build failed: ${JSON.stringify(record.error)}`);
    await sleep(1);
    ({ record } = await call(pool, "GET", path));
  }
  return seconds(t0);
}

/** GET requests/s with IN_FLIGHT requests at once, after a short warm-up. */
async function getRate(pool: Pool, ref: string): Promise<number> {
  const path = `/images/${encodeURIComponent(ref)}?format=${FORMAT}`;
  const burst = async (n: number) => {
    let left = n;
    await Promise.all(
      Array.from({ length: IN_FLIGHT }, async () => {
        while (left-- > 0) {
          const { record } = await call(pool, "GET", path);
          if (record.status !== "ready") throw new Error(`GET ${path}: status ${record.status}`);
        }
      }),
    );
  };
  await burst(IN_FLIGHT * 10);
  const t0 = process.hrtime.bigint();
  await burst(GETS);
  return GETS / seconds(t0);
}

async function main() {
  const work = await makeTempDir("bench-service");
  const registry = await startRegistry();
  try {
    const layers = [];
    for (const [i, [cwd, paths]] of SOURCES.entries()) {
      const tarFile = join(work, `layer-${i}.tar`);
      // Missing paths are fine on other machines: tar warns and skips them.
      spawnSync("tar", ["-C", cwd, "--ignore-failed-read", "-cf", tarFile, ...paths], { stdio: "ignore" });
      layers.push({ tarFile });
    }
    const image = await buildImage(join(work, "layout"), {
      tag: "bench",
      layers,
      config: { cmd: ["/bin/sh"] },
    });
    const pushed = await pushImage(image, registry, "bench/image:1");
    for (const i of layers.keys()) rmSync(join(work, `layer-${i}.tar`));
    rmSync(join(work, "layout"), { recursive: true, force: true });
    const ref = pushed.ref;
    const manifest = JSON.parse(
      await run("skopeo", ["inspect", "--raw", "--tls-verify=false", `docker://${ref}`]),
    );
    const compressed = manifest.layers.reduce((s: number, l: { size: number }) => s + l.size, 0);

    // Service and CLI run with the same environment (no NODE_EXTRA_CA_CERTS, an empty docker config).
    const extra = { DOCKER_CONFIG: work };
    const env = childEnv(extra);
    let artifactBytes = 0;
    const svc = {
      rate: [] as number[],
      uncached: [] as number[],
      present: [] as number[],
      cached: [] as number[],
    };
    const cli = {
      inspect: [] as number[],
      uncached: [] as number[],
      present: [] as number[],
      cached: [] as number[],
    };

    for (let r = 0; r < RUNS; r++) {
      // Service, fresh store: POST → ready (pull and convert), then GETs and POSTs of the ready image.
      const fresh = join(work, `svc-fresh-${r}`);
      const a = await startService(fresh, [], { env: extra });
      const pool = new Pool(a.url, { connections: IN_FLIGHT });
      try {
        svc.uncached.push(await postUntilReady(pool, ref));
        for (let k = 0; k < CACHED_POSTS; k++) {
          const t0 = process.hrtime.bigint();
          const { status, record } = await call(pool, "POST", "/images", { name: ref, format: FORMAT });
          svc.cached.push(seconds(t0));
          if (status !== 200 || record.status !== "ready") throw new Error(`cached POST: ${status}`);
          artifactBytes = statSync(record.artifact!).size;
        }
        svc.rate.push(await getRate(pool, ref));
        // The CLI reading the same record from the same store, while the service runs.
        for (let k = 0; k < INSPECTS; k++)
          cli.inspect.push(time(["--root", fresh, "--json", "inspect", ref], env));
      } finally {
        await pool.close();
        await a.stop();
      }
      rmSync(fresh, { recursive: true, force: true });

      // CLI, fresh store: pull and export in one call.
      const cliFresh = join(work, `cli-fresh-${r}`);
      cli.uncached.push(time(["--root", cliFresh, "--quiet", "pull", ref, "--format", FORMAT], env));
      rmSync(cliFresh, { recursive: true, force: true });

      // CLI, image in the store (untimed `kiln pull`): export builds the artifact into the store.
      const cliStored = join(work, `cli-stored-${r}`);
      time(["--root", cliStored, "--quiet", "pull", ref], env);
      cli.present.push(time(["--root", cliStored, "--quiet", "export", ref, "--format", FORMAT], env));
      // Artifact cached: export finds it in the store.
      cli.cached.push(time(["--root", cliStored, "--quiet", "export", ref, "--format", FORMAT], env));
      rmSync(cliStored, { recursive: true, force: true });

      // Service, image in the store (same untimed `kiln pull`): POST → ready converts only.
      const stored = join(work, `svc-stored-${r}`);
      time(["--root", stored, "--quiet", "pull", ref], env);
      const b = await startService(stored, [], { env: extra });
      const poolB = new Pool(b.url, { connections: 1 });
      try {
        svc.present.push(await postUntilReady(poolB, ref));
      } finally {
        await poolB.close();
        await b.stop();
      }
      rmSync(stored, { recursive: true, force: true });
    }

    const MB = 1e6;
    console.log(
      `image: ${ref}, ${manifest.layers.length} layers, ${(compressed / MB).toFixed(1)} MB compressed; ` +
        `${FORMAT} artifact ${(artifactBytes / MB).toFixed(0)} MB`,
    );
    console.log(`runs: ${RUNS} (median); service times exclude its start, CLI times include process start`);
    const row = (what: string, service: string, cliFig: string, ratio: number) =>
      console.log(
        `${what.padEnd(34)}${service.padStart(14)}${cliFig.padStart(14)}${`${ratio.toFixed(1)}×`.padStart(10)}`,
      );
    const s = (t: number) => (t < 0.1 ? `${(t * 1000).toFixed(1)} ms` : `${t.toFixed(3)} s`);
    console.log(`${"".padEnd(34)}${"service".padStart(14)}${"CLI".padStart(14)}${"speed-up".padStart(10)}`);
    const inspectRate = 1 / median(cli.inspect);
    row(
      "read the image record",
      `${median(svc.rate).toFixed(0)} req/s`,
      `${inspectRate.toFixed(1)} /s`,
      median(svc.rate) / inspectRate,
    );
    row(
      "uncached: pull + convert",
      s(median(svc.uncached)),
      s(median(cli.uncached)),
      median(cli.uncached) / median(svc.uncached),
    );
    row(
      "image stored: convert",
      s(median(svc.present)),
      s(median(cli.present)),
      median(cli.present) / median(svc.present),
    );
    row(
      "artifact cached",
      s(median(svc.cached)),
      s(median(cli.cached)),
      median(cli.cached) / median(svc.cached),
    );
    console.log(
      [
        "",
        "speed-up: CLI time / service time (for rates, service / CLI); above 1 = service faster.",
        `read the image record: service = GET /images/{ref}, ${GETS} requests, ${IN_FLIGHT} in flight on keep-alive`,
        "  connections (undici); CLI = `kiln --json inspect REF` calls per second, one process each.",
        `uncached: service = POST /images {name, format: ${FORMAT}} on a fresh store until GET says ready;`,
        `  CLI = \`kiln pull REF --format ${FORMAT}\` on a fresh store (into the store, as the service).`,
        "image stored: the image pulled beforehand by `kiln pull`, no artifact: service = POST until ready;",
        `  CLI = \`kiln export REF --format ${FORMAT}\` (builds the artifact into the store).`,
        "artifact cached: service = one POST answered 200 ready; CLI = `kiln export` again (finds it).",
      ].join("\n"),
    );
  } finally {
    await registry.stop();
    await removeDir(work);
  }
}

await main();
