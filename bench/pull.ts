/**
 * bench/pull: kiln's cold pull of a real multi-layer image from a loopback registry, beside
 * `skopeo copy docker://… oci:…` measured in the same run, and kiln's warm pull (image present;
 * target: under 0.3 s wall, process start included).
 *
 *   bench/pull            (needs `scripts/setup.sh --test` and a built dist/)
 *   BENCH_RUNS=5 bench/pull
 */
import { spawnSync } from "node:child_process";
import { rmSync } from "node:fs";
import { join } from "node:path";
import { makeTempDir, removeDir, run } from "../test/helpers/exec.js";
import { buildImage, pushImage } from "../test/helpers/images.js";
import { startRegistry } from "../test/helpers/registry.js";

const RUNS = Number(process.env.BENCH_RUNS ?? 3);
const repoRoot = join(import.meta.dirname, "..");

/** Layers made from real files of this machine, so compression ratios are realistic. */
const SOURCES: [string, string[]][] = [
  ["/", ["etc"]],
  ["/", ["usr/lib/python3.11"]],
  ["/", ["usr/bin"]],
  ["/", ["usr/share/perl", "usr/share/zoneinfo", "usr/share/mime"]],
];

function time(cmd: string, args: string[], env: NodeJS.ProcessEnv = {}): number {
  const t0 = process.hrtime.bigint();
  const r = spawnSync(cmd, args, {
    cwd: repoRoot,
    env: { ...process.env, ...env },
    stdio: ["ignore", "ignore", "pipe"],
  });
  const t = Number(process.hrtime.bigint() - t0) / 1e9;
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(" ")} failed: ${r.stderr.toString().trim()}`);
  return t;
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
const fmt = (s: number) => `${s.toFixed(3)} s`;

async function main() {
  const work = await makeTempDir("bench-pull");
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
    const manifest = JSON.parse(
      await run("skopeo", ["inspect", "--raw", "--tls-verify=false", `docker://${pushed.ref}`]),
    );
    const compressed = manifest.layers.reduce((s: number, l: { size: number }) => s + l.size, 0);
    console.log(
      `image: ${pushed.ref}, ${manifest.layers.length} layers, ${(compressed / 1e6).toFixed(1)} MB compressed`,
    );

    const env = { DOCKER_CONFIG: work };
    const cold: number[] = [];
    const skopeoT: number[] = [];
    const warm: number[] = [];
    for (let r = 0; r < RUNS; r++) {
      const store = join(work, `store-${r}`);
      cold.push(time("node", ["bin/kiln", "--root", store, "--quiet", "pull", pushed.ref], env));
      for (let w = 0; w < 3; w++)
        warm.push(time("node", ["bin/kiln", "--root", store, "--quiet", "pull", pushed.ref], env));
      rmSync(store, { recursive: true, force: true });
      const oci = join(work, `oci-${r}`);
      skopeoT.push(
        time("skopeo", [
          "--insecure-policy",
          "copy",
          "-q",
          "--src-tls-verify=false",
          `docker://${pushed.ref}`,
          `oci:${oci}:1`,
        ]),
      );
      rmSync(oci, { recursive: true, force: true });
    }
    const mbps = (s: number) => `${(compressed / 1e6 / s).toFixed(0)} MB/s`;
    console.log(`runs: ${RUNS} (median)`);
    console.log(`kiln cold pull        ${fmt(median(cold))}  ${mbps(median(cold))}`);
    console.log(`skopeo copy → oci:    ${fmt(median(skopeoT))}  ${mbps(median(skopeoT))}`);
    console.log(
      `ratio kiln / skopeo   ${(median(cold) / median(skopeoT)).toFixed(2)}×  (below 1 = kiln faster)`,
    );
    console.log(
      `kiln warm pull        ${fmt(median(warm))}  (target < 0.300 s: ${median(warm) < 0.3 ? "met" : "NOT met"})`,
    );
  } finally {
    await registry.stop();
    await removeDir(work);
  }
}

await main();
