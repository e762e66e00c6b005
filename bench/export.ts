/**
 * bench/export: kiln's tar → ext4 and tar → EROFS (`kiln export`, end to end, process start
 * included) beside `umoci unpack` + `mkfs.ext4 -d` and `umoci unpack` + `mkfs.erofs`, measured in
 * the same run on the same images, and kiln's peak RSS. Images made from this machine's files:
 * (a) one large uncompressed layer (≥ 500 MB), (b) a 4-layer gzip image laid out like a Debian
 * rootfs, and (b') the same layers uncompressed, for the writer's throughput without gzip. Each is
 * imported once (untimed); the artifact cache is emptied before each export. kiln's phases (reading
 * layers, writing the image, copying it out) come from its --verbose lines. `sync` runs (untimed)
 * before every timed command, so none pays for the writeback of the one before it.
 *
 *   bench/export            (needs umoci, e2fsprogs, erofs-utils and a built dist/)
 *   BENCH_RUNS=3 bench/export
 */
import { spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import { createReadStream, readFileSync, rmSync, statSync } from "node:fs";
import { mkdir, rename, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { makeTempDir, removeDir } from "../test/helpers/exec.js";
import { buildImage, MEDIA } from "../test/helpers/images.js";

const RUNS = Number(process.env.BENCH_RUNS ?? 1);
const repoRoot = join(import.meta.dirname, "..");
const MB = 1e6;
const RSS_TARGET_MB = 256;

/** (a): at least 500 MB of real files in one tar; the second path only if the first is too small. */
const BIG_SOURCES = ["usr/lib/x86_64-linux-gnu", "usr/share"];
const BIG_MIN = 500 * MB;

/** (b): Debian-like layers (base config, an interpreter, binaries, data), gzip-compressed by umoci. */
const ROOTFS_LAYERS: string[][] = [
  ["etc"],
  ["usr/lib/python3.11"],
  ["usr/bin"],
  ["usr/share/perl", "usr/share/zoneinfo", "usr/share/mime"],
];

interface Measured {
  seconds: number;
  rssMB: number;
  /** kiln's phases (--verbose lines): seconds of reading, writing, copying. */
  phases?: Record<Phase, number>;
}

type Phase = "reading" | "writing" | "copying";

/** "writing ext4: done 151 MB/151 MB in 2.06 s, 73.5 MB/s" → { writing: 2.06 } */
function phasesOf(stderr: string): Record<Phase, number> {
  const phases: Record<Phase, number> = { reading: 0, writing: 0, copying: 0 };
  for (const m of stderr.matchAll(/^(reading|writing|copying)[^:]*: done .* in ([\d.]+) s/gm)) {
    phases[m[1] as Phase] += Number(m[2]);
  }
  return phases;
}

/** Runs a command under /usr/bin/time: wall time and peak RSS of the process. */
function measure(cmd: string, args: string[], rssFile: string): Measured {
  // Untimed: the writeback of what the previous command wrote must not slow this one.
  spawnSync("sync");
  const t0 = process.hrtime.bigint();
  const r = spawnSync("/usr/bin/time", ["-f", "%M", "-o", rssFile, cmd, ...args], {
    cwd: repoRoot,
    stdio: ["ignore", "ignore", "pipe"],
  });
  const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(" ")} failed: ${r.stderr.toString().trim()}`);
  const kb = Number(readFileSync(rssFile, "utf8").trim().split("\n").pop());
  return { seconds, rssMB: (kb * 1024) / MB, phases: phasesOf(r.stderr.toString()) };
}

function sh(cmd: string, args: string[]): string {
  const r = spawnSync(cmd, args, { cwd: repoRoot, stdio: ["ignore", "pipe", "pipe"] });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(" ")} failed: ${r.stderr.toString().trim()}`);
  return r.stdout.toString();
}

/** A tar of paths under / (missing ones skipped, so other machines still work); returns its size. */
function makeTar(file: string, paths: string[]): number {
  spawnSync("tar", ["-C", "/", "--ignore-failed-read", "-cf", file, ...paths], { stdio: "ignore" });
  return statSync(file).size;
}

async function sha256File(file: string): Promise<string> {
  const h = createHash("sha256");
  for await (const chunk of createReadStream(file, { highWaterMark: 1 << 20 })) h.update(chunk as Buffer);
  return h.digest("hex");
}

/** An OCI layout holding one image whose layers are `tarFiles`, uncompressed (the tars are moved in). */
async function uncompressedLayout(dir: string, tag: string, tarFiles: string[]): Promise<void> {
  const blobs = join(dir, "blobs", "sha256");
  await mkdir(blobs, { recursive: true });
  const put = async (bytes: Buffer) => {
    const hex = createHash("sha256").update(bytes).digest("hex");
    await writeFile(join(blobs, hex), bytes);
    return { digest: `sha256:${hex}`, size: bytes.length };
  };
  const layers: { hex: string; size: number }[] = [];
  for (const tarFile of tarFiles) {
    const hex = await sha256File(tarFile);
    layers.push({ hex, size: statSync(tarFile).size });
    await rename(tarFile, join(blobs, hex));
  }
  const arch = process.arch === "x64" ? "amd64" : process.arch;
  const config = await put(
    Buffer.from(
      JSON.stringify({
        created: "2024-01-01T00:00:00Z",
        architecture: arch,
        os: "linux",
        config: { Cmd: ["/bin/sh"] },
        rootfs: { type: "layers", diff_ids: layers.map((l) => `sha256:${l.hex}`) },
        history: layers.map(() => ({ created: "2024-01-01T00:00:00Z" })),
      }),
    ),
  );
  const manifest = await put(
    Buffer.from(
      JSON.stringify({
        schemaVersion: 2,
        mediaType: MEDIA.OCI_MANIFEST,
        config: { mediaType: MEDIA.OCI_CONFIG, ...config },
        layers: layers.map((l) => ({ mediaType: MEDIA.OCI_LAYER, digest: `sha256:${l.hex}`, size: l.size })),
      }),
    ),
  );
  await writeFile(join(dir, "oci-layout"), JSON.stringify({ imageLayoutVersion: "1.0.0" }));
  await writeFile(
    join(dir, "index.json"),
    JSON.stringify({
      schemaVersion: 2,
      manifests: [
        {
          mediaType: MEDIA.OCI_MANIFEST,
          ...manifest,
          annotations: { "org.opencontainers.image.ref.name": tag },
        },
      ],
    }),
  );
}

interface Bench {
  name: string;
  /** OCI layout dir and tag (umoci's `DIR:TAG`). */
  layout: string;
  tag: string;
  layers: number;
  uncompressed: number;
  /** gzip layers (umoci's default), else uncompressed. */
  gzip: boolean;
  /** Also time umoci unpack + mkfs (not for the uncompressed copy of an image already compared). */
  pipeline: boolean;
}

type Format = "ext4" | "erofs";
const FORMATS: Format[] = ["ext4", "erofs"];

interface Results {
  kiln: Record<Format, Measured[]>;
  /** The same export again: the artifact is in the store's cache. */
  cached: Record<Format, Measured[]>;
  unpack: Measured[];
  mkfs: Record<Format, Measured[]>;
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

async function runBench(b: Bench, work: string): Promise<Results> {
  const store = join(work, `store-${b.name}`);
  const digest = sh("node", [
    "bin/kiln",
    "--root",
    store,
    "--quiet",
    "import",
    "--tag",
    `bench/${b.name}:1`,
    b.layout,
  ])
    .trim()
    .split("\n")
    .pop()!;
  const rss = join(work, "rss");
  const res: Results = {
    kiln: { ext4: [], erofs: [] },
    cached: { ext4: [], erofs: [] },
    unpack: [],
    mkfs: { ext4: [], erofs: [] },
  };
  for (let r = 0; r < RUNS; r++) {
    let ext4Size = 0;
    for (const format of FORMATS) {
      // The image stays; its cached artifacts go, so each export builds from the layers.
      rmSync(join(store, "artifacts"), { recursive: true, force: true });
      const out = join(work, `kiln.${format}`);
      const args = [
        "bin/kiln",
        "--root",
        store,
        "--verbose",
        "export",
        digest,
        "--format",
        format,
        "-o",
        out,
      ];
      res.kiln[format].push(measure("node", args, rss));
      if (format === "ext4") ext4Size = statSync(out).size;
      res.cached[format].push(measure("node", args, rss));
      rmSync(out, { force: true });
    }
    if (!b.pipeline) continue;
    const bundle = join(work, "bundle");
    res.unpack.push(measure("umoci", ["unpack", "--image", `${b.layout}:${b.tag}`, bundle], rss));
    const rootfs = join(bundle, "rootfs");
    const ext4 = join(work, "mkfs.ext4");
    // Same size as kiln's disk, and no journal, as kiln writes by default.
    const size = `${Math.ceil(ext4Size / 1024)}k`;
    res.mkfs.ext4.push(
      measure("mkfs.ext4", ["-q", "-F", "-O", "^has_journal", "-d", rootfs, ext4, size], rss),
    );
    rmSync(ext4, { force: true });
    const erofs = join(work, "mkfs.erofs");
    res.mkfs.erofs.push(measure("mkfs.erofs", ["--quiet", erofs, rootfs], rss));
    rmSync(erofs, { force: true });
    rmSync(bundle, { recursive: true, force: true });
  }
  rmSync(store, { recursive: true, force: true });
  return res;
}

const WRITER_TARGET = 400;

function report(b: Bench, res: Results): number {
  const secs = (xs: Measured[]) => median(xs.map((x) => x.seconds));
  const phase = (xs: Measured[], p: Phase) => median(xs.map((x) => x.phases?.[p] ?? 0));
  const peak = (xs: Measured[]) => Math.max(...xs.map((x) => x.rssMB));
  const mbs = (s: number) => (s > 0 ? b.uncompressed / MB / s : 0);
  const rate = (s: number) => `${mbs(s).toFixed(0).padStart(5)} MB/s`;
  const f2 = (s: number) => s.toFixed(2).padStart(6);
  console.log(
    `\n${b.name}: ${b.layers} ${b.gzip ? "gzip" : "uncompressed"} layer(s), ${(b.uncompressed / MB).toFixed(0)} MB uncompressed; runs: ${RUNS} (median)`,
  );
  const unpack = b.pipeline ? secs(res.unpack) : 0;
  for (const format of FORMATS) {
    const kiln = secs(res.kiln[format]);
    const [reading, writing, copying] = (["reading", "writing", "copying"] as const).map((p) =>
      phase(res.kiln[format], p),
    );
    console.log(
      `  kiln export ${format.padEnd(5)}            ${f2(kiln)} s ${rate(kiln)}   (reading ${reading.toFixed(2)} s + writing ${writing.toFixed(2)} s + copying out ${copying.toFixed(2)} s; the rest is start-up)`,
    );
    const convert = reading + writing;
    const met = (x: number) => (x >= WRITER_TARGET ? "met" : "NOT met");
    console.log(
      `    conversion (reading + writing)  ${f2(convert)} s ${rate(convert)}   writing alone ${rate(writing)}${b.gzip ? "  (gzip: decompression included)" : `  (target ≥ ${WRITER_TARGET} MB/s: conversion ${met(mbs(convert))}, writing ${met(mbs(writing))})`}`,
    );
    console.log(`  kiln export ${format.padEnd(5)} again (cache) ${f2(secs(res.cached[format]))} s`);
    if (!b.pipeline) continue;
    const mkfs = secs(res.mkfs[format]);
    const pipeline = unpack + mkfs;
    const ratio = pipeline / kiln;
    console.log(
      `  umoci unpack + mkfs.${format.padEnd(5)}   ${f2(pipeline)} s ${rate(pipeline)}   (unpack ${unpack.toFixed(2)} s + mkfs ${mkfs.toFixed(2)} s)`,
    );
    console.log(
      `  ratio pipeline / kiln         ${ratio.toFixed(2)}×  (target ≥ 2×: ${ratio >= 2 ? "met" : "NOT met"})`,
    );
  }
  const rss = Math.max(...FORMATS.flatMap((f) => [peak(res.kiln[f]), peak(res.cached[f])]));
  console.log(
    `  kiln peak RSS                 ${rss.toFixed(0)} MB  (target ≤ ${RSS_TARGET_MB} MB: ${rss <= RSS_TARGET_MB ? "met" : "NOT met"})`,
  );
  return rss;
}

async function main() {
  const work = await makeTempDir("bench-export");
  try {
    // (a) one large uncompressed layer.
    const bigTar = join(work, "big.tar");
    let bigSize = makeTar(bigTar, BIG_SOURCES.slice(0, 1));
    if (bigSize < BIG_MIN) bigSize = makeTar(bigTar, BIG_SOURCES);
    const bigLayout = join(work, "big-layout");
    await uncompressedLayout(bigLayout, "1", [bigTar]);
    const big: Bench = {
      name: "large-layer",
      layout: bigLayout,
      tag: "1",
      layers: 1,
      uncompressed: bigSize,
      gzip: false,
      pipeline: true,
    };

    // (b) a multi-layer gzip rootfs, and (b') the same layers uncompressed.
    let rootfsSize = 0;
    const layers = [];
    for (const [i, paths] of ROOTFS_LAYERS.entries()) {
      const tarFile = join(work, `layer-${i}.tar`);
      rootfsSize += makeTar(tarFile, paths);
      layers.push({ tarFile });
    }
    const rootfsLayout = join(work, "rootfs-layout");
    await buildImage(rootfsLayout, { tag: "1", layers, config: { cmd: ["/bin/sh"] } });
    const plainLayout = join(work, "rootfs-plain-layout");
    await uncompressedLayout(
      plainLayout,
      "1",
      layers.map((l) => l.tarFile),
    );
    const rootfs: Bench = {
      name: "debian-like",
      layout: rootfsLayout,
      tag: "1",
      layers: layers.length,
      uncompressed: rootfsSize,
      gzip: true,
      pipeline: true,
    };
    const plain: Bench = {
      ...rootfs,
      name: "debian-like-uncompressed",
      layout: plainLayout,
      gzip: false,
      pipeline: false,
    };

    for (const b of [big, rootfs, plain]) report(b, await runBench(b, work));
  } finally {
    await removeDir(work);
  }
}

await main();
