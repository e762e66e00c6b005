/**
 * npm run bench: kiln beside the tools people use today, on real images from a loopback registry
 * (fresh storage each run), medians over BENCH_RUNS runs, every ratio measured in the same run.
 *
 *   - cold pull → ext4 / erofs / cpio: `kiln pull --format F -o OUT` on an empty store, beside
 *     `skopeo copy` + `umoci unpack` + `mkfs.ext4 -d` / `mkfs.erofs` / `find | cpio`, and beside the
 *     decompression limit: fetching and decompressing the same layers (curl | gzip -d / zstd -d,
 *     as many at once as there are cores) with nothing else;
 *   - each writer's throughput on uncompressed layers (`kiln export`, its "writing" phase and whole);
 *   - warm pull (image present) and cached export, process start included;
 *   - a second image sharing the base layer: bytes downloaded (a counting proxy), beside skopeo;
 *   - peak RSS and cores used by each kiln command; output sizes beside the mkfs tools';
 *   - memory per entry: peak RSS of `kiln export` of a generated layer of 1,000,000 files
 *     (bench/entries.ts; BENCH_IMAGES=entries runs it alone).
 *
 * Results go to bench/.results/<time>.json (and latest.json); `--compare FILE` prints each figure
 * beside an earlier run's.
 *
 *   npm run bench                       (after scripts/setup.sh --test; builds fixtures once)
 *   BENCH_RUNS=1 BENCH_IMAGES=debian npm run bench
 *   npm run bench -- --compare bench/.results/2026-11-23T10-00-00.json
 */
import { mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { availableParallelism } from "node:os";
import { join } from "node:path";
import { run } from "../test/helpers/exec.js";
import { startRegistry } from "../test/helpers/registry.js";
import {
  MB,
  type Measured,
  mb,
  measure,
  median,
  REPO_ROOT,
  ratio,
  secs,
  sh,
  sizes,
  startCountingProxy,
  table,
} from "./common.js";
import { benchEntries, ENTRIES_GOAL, type EntriesResult } from "./entries.js";
import { ensureFixtures, type Fixture } from "./fixtures.js";

const RUNS = Number(process.env.BENCH_RUNS ?? 3);
const ONLY = process.env.BENCH_IMAGES?.split(",");
const FORMATS = ["ext4", "erofs", "cpio"] as const;
type Format = (typeof FORMATS)[number];

const TARGETS = {
  /** cold pull → ext4 over the skopeo + umoci + mkfs.ext4 pipeline */
  vsPipeline: 0.4,
  /** cold pull → ext4 over the decompression limit */
  vsLimit: 1.3,
  writerMBps: 400,
  warmSeconds: 0.3,
  rssMB: 256,
};

/** Run as users run it: its shell part defers NODE_EXTRA_CA_CERTS (`node bin/kiln` would not). */
const KILN = "bin/kiln";
const work = join(REPO_ROOT, "bench", ".cache", "work");
const resultsDir = join(REPO_ROOT, "bench", ".results");

interface Figures {
  seconds: number;
  rssMB?: number;
  cores?: number;
}

/** Everything measured for one image; each list holds one figure per run. */
interface ImageResults {
  image: string;
  layers: number;
  compressed: number;
  uncompressed: number;
  files: number;
  limit: number[];
  /** dd writing (and fdatasync'ing) the blobs' bytes plus the ext4 image's: a pull's disk floor. */
  diskPull: number[];
  /** dd writing the ext4 image's allocated bytes alone: the writers' disk floor. */
  diskImage: number[];
  /** `node -e 0`: the process start every kiln command pays. */
  nodeStart: number[];
  kilnCold: Record<Format, Figures[]>;
  skopeo: number[];
  umoci: number[];
  mkfs: Record<Format, number[]>;
  warm: Figures[];
  cachedExport: Figures[];
  /** Uncompressed input: whole export and its writing phase, seconds. */
  writer: Record<Format, { seconds: number; writing: number }[]>;
  sizes: Record<Format, { kiln: number; kilnAllocated: number; peer: number; peerAllocated: number }>;
  shared?: { base: string; kilnBytes: number; skopeoBytes: number; imageBytes: number; newBytes: number };
}

const kiln = (root: string, args: string[]): Measured => measure(KILN, ["--root", root, ...args]);

/** kiln's "writing FORMAT: done … in S s" line (--verbose): seconds of pass 2. */
function writingSeconds(stderr: string): number {
  let total = 0;
  for (const m of stderr.matchAll(/^writing [^:]*: done .* in ([\d.]+) s/gm)) total += Number(m[1]);
  return total;
}

/**
 * The disk alone: `bytes` written by dd and fdatasync'ed, what anything that keeps those bytes
 * durably waits for at least. With O_DIRECT, as kiln's writers send their aligned runs: through the
 * page cache these VMs charge for every fresh page, several times what the disk takes, so a
 * buffered dd measured that rather than the disk (through the page cache where the filesystem
 * refuses O_DIRECT). These machines' disks vary from minute to minute, so it is measured in the
 * same run as what it is compared with.
 */
function diskSeconds(dir: string, bytes: number): number {
  const file = join(dir, "dd.out");
  const count = Math.ceil(bytes / 2 ** 20);
  const dd = (direct: boolean) =>
    measure("dd", [
      "if=/dev/zero",
      `of=${file}`,
      "bs=1M",
      `count=${count}`,
      "conv=fdatasync",
      ...(direct ? ["oflag=direct"] : []),
      "status=none",
    ]).seconds;
  let s: number;
  try {
    s = dd(true);
  } catch {
    s = dd(false);
  }
  rmSync(file, { force: true });
  return s;
}

/** Fetch + decompress every layer with nothing else, as many at once as there are cores. */
function decompressionLimit(registry: string, repo: string, f: Fixture): number {
  const lines = f.layers.map((l) => {
    const tool = l.mediaType.endsWith("zstd")
      ? "zstd -dcq"
      : l.mediaType.endsWith("gzip")
        ? "gzip -dc"
        : "cat";
    return `curl -sf http://${registry}/v2/${repo}/blobs/${l.digest} | ${tool} > /dev/null`;
  });
  const script = lines.map((l) => `echo ${JSON.stringify(l)}`).join("; ");
  return measure("bash", [
    "-o",
    "pipefail",
    "-c",
    `(${script}) | xargs -d '\\n' -P ${availableParallelism()} -I{} bash -o pipefail -c {}`,
  ]).seconds;
}

function pushFixtures(fixtures: Fixture[], registry: string): Map<string, string> {
  const refs = new Map<string, string>();
  for (const f of fixtures) {
    const ref = `${registry}/bench/${f.name}:1`;
    sh("skopeo", [
      "--insecure-policy",
      "copy",
      "-q",
      "--preserve-digests",
      "--dest-tls-verify=false",
      `oci:${f.layout}:${f.tag}`,
      `docker://${ref}`,
    ]);
    refs.set(f.name, ref);
  }
  return refs;
}

function emptyFormats<T>(make: () => T): Record<Format, T> {
  return { ext4: make(), erofs: make(), cpio: make() };
}

async function benchImage(
  f: Fixture,
  ref: string,
  registry: string,
  log: (s: string) => void,
): Promise<ImageResults> {
  const res: ImageResults = {
    image: f.name,
    layers: f.layers.length,
    compressed: f.layers.reduce((n, l) => n + l.size, 0),
    uncompressed: f.uncompressed,
    files: f.files,
    limit: [],
    diskPull: [],
    diskImage: [],
    nodeStart: [],
    kilnCold: emptyFormats(() => []),
    skopeo: [],
    umoci: [],
    mkfs: emptyFormats(() => []),
    warm: [],
    cachedExport: [],
    writer: emptyFormats(() => []),
    sizes: emptyFormats(() => ({ kiln: 0, kilnAllocated: 0, peer: 0, peerAllocated: 0 })),
  };
  const repo = `bench/${f.name}`;
  const pull = ["--insecure-registry", registry];
  const dir = join(work, f.name);
  rmSync(dir, { recursive: true, force: true });
  mkdirSync(dir, { recursive: true });

  for (let r = 0; r < RUNS; r++) {
    log(`${f.name}: run ${r + 1}/${RUNS}`);
    res.limit.push(decompressionLimit(registry, repo, f));

    // kiln: cold pull straight to each format, each on an empty store.
    let ext4Size = 0;
    let ext4Allocated = 0;
    for (const format of FORMATS) {
      const store = join(dir, `store-${format}`);
      rmSync(store, { recursive: true, force: true });
      const out = join(dir, `kiln.${format}`);
      const m = kiln(store, ["--quiet", "pull", ...pull, ref, "--format", format, "-o", out]);
      res.kilnCold[format].push({ seconds: m.seconds, rssMB: m.rssMB, cores: m.cores });
      const s = sizes(out);
      res.sizes[format].kiln = s.apparent;
      res.sizes[format].kilnAllocated = s.allocated;
      if (format === "ext4") {
        ext4Size = s.apparent;
        ext4Allocated = s.allocated;
      }
      rmSync(out, { force: true });
      if (format !== "ext4") rmSync(store, { recursive: true, force: true });
    }

    res.diskPull.push(diskSeconds(dir, res.compressed + ext4Allocated));
    res.diskImage.push(diskSeconds(dir, ext4Allocated));
    for (let w = 0; w < 3; w++) res.nodeStart.push(measure("node", ["-e", "0"]).seconds);

    // Warm pull and cached export on the ext4 run's store (the image is there).
    const store = join(dir, "store-ext4");
    for (let w = 0; w < 3; w++) {
      const m = kiln(store, ["--quiet", "pull", ...pull, ref]);
      res.warm.push({ seconds: m.seconds, rssMB: m.rssMB });
    }
    kiln(store, ["--quiet", "export", ref, "--format", "ext4"]); // into the store's cache
    for (let w = 0; w < 3; w++) {
      const m = kiln(store, ["--quiet", "export", ref, "--format", "ext4"]);
      res.cachedExport.push({ seconds: m.seconds, rssMB: m.rssMB });
    }
    rmSync(store, { recursive: true, force: true });

    // The tools people use today: skopeo copy, umoci unpack, then mkfs / find | cpio.
    const oci = join(dir, "oci");
    const bundle = join(dir, "bundle");
    rmSync(oci, { recursive: true, force: true });
    rmSync(bundle, { recursive: true, force: true });
    res.skopeo.push(
      measure("skopeo", [
        "--insecure-policy",
        "copy",
        "-q",
        "--src-tls-verify=false",
        `docker://${ref}`,
        `oci:${oci}:1`,
      ]).seconds,
    );
    res.umoci.push(measure("umoci", ["unpack", "--image", `${oci}:1`, bundle]).seconds);
    const rootfs = join(bundle, "rootfs");
    const peerOut = (format: Format) => join(dir, `peer.${format}`);
    // Same size as kiln's disk, and no journal, as kiln writes by default.
    res.mkfs.ext4.push(
      measure("mkfs.ext4", [
        "-q",
        "-F",
        "-O",
        "^has_journal",
        "-d",
        rootfs,
        peerOut("ext4"),
        `${Math.ceil(ext4Size / 1024)}k`,
      ]).seconds,
    );
    res.mkfs.erofs.push(measure("mkfs.erofs", ["--quiet", peerOut("erofs"), rootfs]).seconds);
    res.mkfs.cpio.push(
      measure("bash", ["-c", `cd '${rootfs}' && find . | cpio -o -H newc --quiet > '${peerOut("cpio")}'`])
        .seconds,
    );
    for (const format of FORMATS) {
      const s = sizes(peerOut(format));
      res.sizes[format].peer = s.apparent;
      res.sizes[format].peerAllocated = s.allocated;
      rmSync(peerOut(format), { force: true });
    }
    rmSync(oci, { recursive: true, force: true });
    rmSync(bundle, { recursive: true, force: true });
  }

  // Writers on uncompressed input: the raw layout imported once, each export from an empty cache.
  const rawStore = join(dir, "store-raw");
  rmSync(rawStore, { recursive: true, force: true });
  sh(KILN, ["--root", rawStore, "--quiet", "import", "--tag", `bench/${f.name}-raw:1`, f.raw.layout]);
  for (let r = 0; r < RUNS; r++) {
    for (const format of FORMATS) {
      rmSync(join(rawStore, "artifacts"), { recursive: true, force: true });
      const m = kiln(rawStore, ["--verbose", "export", `bench/${f.name}-raw:1`, "--format", format]);
      res.writer[format].push({ seconds: m.seconds, writing: writingSeconds(m.stderr) });
    }
  }
  rmSync(rawStore, { recursive: true, force: true });
  rmSync(dir, { recursive: true, force: true });
  return res;
}

/** A second image whose base layer is already there: bytes each tool downloads for it. */
async function sharedBase(
  base: Fixture,
  image: Fixture,
  refs: Map<string, string>,
  registry: string,
): Promise<NonNullable<ImageResults["shared"]>> {
  const proxy = await startCountingProxy(registry);
  const dir = join(work, "shared");
  rmSync(dir, { recursive: true, force: true });
  mkdirSync(dir, { recursive: true });
  const via = (ref: string) => ref.replace(registry, proxy.host);
  try {
    // Asynchronous: the proxy runs in this process.
    const store = join(dir, "store");
    const kilnPull = (name: string) =>
      run(
        KILN,
        ["--root", store, "--quiet", "pull", "--insecure-registry", proxy.host, via(refs.get(name)!)],
        {
          cwd: REPO_ROOT,
        },
      );
    await kilnPull(base.name);
    proxy.reset();
    await kilnPull(image.name);
    const kilnBytes = proxy.bytes();

    const oci = join(dir, "oci");
    const copy = (name: string) =>
      run("skopeo", [
        "--insecure-policy",
        "copy",
        "-q",
        "--src-tls-verify=false",
        `docker://${via(refs.get(name)!)}`,
        `oci:${oci}:${name}`,
      ]);
    await copy(base.name);
    proxy.reset();
    await copy(image.name);
    const skopeoBytes = proxy.bytes();
    const baseDigests = new Set(base.layers.map((l) => l.digest));
    return {
      base: base.name,
      kilnBytes,
      skopeoBytes,
      imageBytes: image.layers.reduce((n, l) => n + l.size, 0),
      newBytes: image.layers.filter((l) => !baseDigests.has(l.digest)).reduce((n, l) => n + l.size, 0),
    };
  } finally {
    await proxy.close();
    rmSync(dir, { recursive: true, force: true });
  }
}

/** Medians of one image's figures, flat, for the JSON file and --compare. */
function summarize(r: ImageResults): Record<string, number> {
  const m = (xs: number[]) => median(xs);
  const out: Record<string, number> = {
    limit: m(r.limit),
    diskPull: m(r.diskPull),
    diskImage: m(r.diskImage),
    nodeStart: m(r.nodeStart),
    // In the writers' terms: MB/s of their uncompressed input.
    "diskImage.MBps": r.uncompressed / MB / m(r.diskImage),
    skopeo: m(r.skopeo),
    umoci: m(r.umoci),
    warm: m(r.warm.map((x) => x.seconds)),
    warmRssMB: Math.max(...r.warm.map((x) => x.rssMB ?? 0)),
    cachedExport: m(r.cachedExport.map((x) => x.seconds)),
  };
  for (const f of FORMATS) {
    const cold = m(r.kilnCold[f].map((x) => x.seconds));
    const pipeline = m(r.skopeo.map((s, i) => s + r.umoci[i]! + r.mkfs[f][i]!));
    out[`cold.${f}`] = cold;
    out[`cold.${f}.rssMB`] = Math.max(...r.kilnCold[f].map((x) => x.rssMB ?? 0));
    out[`cold.${f}.cores`] = m(r.kilnCold[f].map((x) => x.cores ?? 0));
    out[`pipeline.${f}`] = pipeline;
    out[`mkfs.${f}`] = m(r.mkfs[f]);
    out[`cold.${f}/pipeline`] = cold / pipeline;
    out[`cold.${f}/limit`] = cold / out.limit!;
    out[`cold.${f}/disk`] = cold / out.diskPull!;
    out[`writer.${f}.MBps`] = r.uncompressed / MB / m(r.writer[f].map((x) => x.writing));
    out[`export.${f}.MBps`] = r.uncompressed / MB / m(r.writer[f].map((x) => x.seconds));
    out[`size.${f}`] = r.sizes[f].kiln;
    out[`size.${f}.peer`] = r.sizes[f].peer;
  }
  if (r.shared) {
    out.sharedKilnBytes = r.shared.kilnBytes;
    out.sharedSkopeoBytes = r.shared.skopeoBytes;
  }
  return out;
}

function report(all: ImageResults[], sums: Record<string, Record<string, number>>): string[] {
  const lines: string[] = [];
  const cells = (fn: (r: ImageResults, s: Record<string, number>) => string) =>
    all.map((r) => fn(r, sums[r.image]!));
  const head = ["", ...all.map((r) => r.image)];
  lines.push(
    table([
      head,
      ["layers", ...cells((r) => String(r.layers))],
      ["compressed", ...cells((r) => mb(r.compressed))],
      ["uncompressed", ...cells((r) => mb(r.uncompressed))],
      ["files", ...cells((r) => String(r.files))],
    ]),
    "",
    `Cold pull (medians of ${RUNS}; kiln: pull --format F -o OUT on an empty store)`,
  );
  const rows = [
    head,
    ["decompression limit", ...cells((_, s) => secs(s.limit!))],
    ["disk floor (dd: blobs + image)", ...cells((_, s) => secs(s.diskPull!))],
  ];
  for (const f of FORMATS) {
    rows.push(
      [`kiln → ${f}`, ...cells((_, s) => secs(s[`cold.${f}`]!))],
      [
        `  skopeo+umoci+${f === "cpio" ? "find|cpio" : `mkfs.${f}`}`,
        ...cells((_, s) => secs(s[`pipeline.${f}`]!)),
      ],
      [`  ratio to pipeline`, ...cells((_, s) => ratio(s[`cold.${f}/pipeline`]!))],
      [`  ratio to limit`, ...cells((_, s) => ratio(s[`cold.${f}/limit`]!))],
      [`  ratio to disk floor`, ...cells((_, s) => ratio(s[`cold.${f}/disk`]!))],
      [
        `  peak RSS, cores used`,
        ...cells((_, s) => `${s[`cold.${f}.rssMB`]!.toFixed(0)} MB, ${s[`cold.${f}.cores`]!.toFixed(2)}`),
      ],
    );
  }
  rows.push(["(skopeo copy, umoci unpack)", ...cells((_, s) => `${secs(s.skopeo!)}, ${secs(s.umoci!)}`)]);
  lines.push(table(rows), "", "Writers on uncompressed layers (kiln export: writing phase / whole command)");
  lines.push(
    table([
      head,
      ...FORMATS.map((f) => [
        f,
        ...cells(
          (_, s) => `${s[`writer.${f}.MBps`]!.toFixed(0)} / ${s[`export.${f}.MBps`]!.toFixed(0)} MB/s`,
        ),
      ]),
      ["disk floor (dd: ext4 image)", ...cells((_, s) => `${s["diskImage.MBps"]!.toFixed(0)} MB/s`)],
    ]),
    "",
    "Warm and cached (process start included)",
  );
  lines.push(
    table([
      head,
      ["warm pull", ...cells((_, s) => `${secs(s.warm!)} (${s.warmRssMB!.toFixed(0)} MB)`)],
      ["node start (node -e 0)", ...cells((_, s) => secs(s.nodeStart!))],
      ["cached export (store)", ...cells((_, s) => secs(s.cachedExport!))],
    ]),
    "",
    "Output sizes, kiln / peer (apparent; allocated in brackets)",
  );
  lines.push(
    table([
      head,
      ...FORMATS.map((f) => [
        f,
        ...cells(
          (r) =>
            `${mb(r.sizes[f].kiln)} (${mb(r.sizes[f].kilnAllocated)}) / ${mb(r.sizes[f].peer)} (${mb(r.sizes[f].peerAllocated)})`,
        ),
      ]),
    ]),
  );
  const shared = all.filter((r) => r.shared);
  if (shared.length) {
    lines.push("", "A second image on top of a base already pulled: bytes downloaded");
    lines.push(
      table([
        ["", "kiln", "skopeo", "its new layers", "whole image"],
        ...shared.map((r) => [
          `${r.image} after ${r.shared!.base}`,
          mb(r.shared!.kilnBytes),
          mb(r.shared!.skopeoBytes),
          mb(r.shared!.newBytes),
          mb(r.shared!.imageBytes),
        ]),
      ]),
    );
  }
  return lines;
}

function targets(all: ImageResults[], sums: Record<string, Record<string, number>>): string[] {
  const met = (ok: boolean) => (ok ? "met" : "NOT met");
  const worst = (key: string, max = true) => {
    const xs = all.map((r) => sums[r.image]![key]!);
    return max ? Math.max(...xs) : Math.min(...xs);
  };
  const vsPipeline = worst("cold.ext4/pipeline");
  const vsLimit = worst("cold.ext4/limit");
  const floors = all.map((r) => sums[r.image]!.diskPull! / sums[r.image]!.limit!);
  const writerRows = all.flatMap((r) =>
    FORMATS.map((f) => ({ r, f, mbps: sums[r.image]![`writer.${f}.MBps`]! })),
  );
  const slowest = writerRows.reduce((a, b) => (b.mbps < a.mbps ? b : a));
  const warm = worst("warm");
  const nodeStart = worst("nodeStart");
  const big = all.find((r) => r.uncompressed >= 1e9);
  const rss = big ? Math.max(...FORMATS.map((f) => sums[big.image]![`cold.${f}.rssMB`]!)) : Number.NaN;
  return [
    `cold pull → ext4 ≤ ${TARGETS.vsPipeline}× skopeo+umoci+mkfs.ext4: worst ${ratio(vsPipeline)} — ${met(vsPipeline <= TARGETS.vsPipeline)}`,
    `cold pull → ext4 ≤ ${TARGETS.vsLimit}× decompression limit: worst ${ratio(vsLimit)} — ${met(vsLimit <= TARGETS.vsLimit)} (writing the blobs and the image with dd alone takes ${floors.map(ratio).join(", ")} the limit here)`,
    `writers ≥ ${TARGETS.writerMBps} MB/s on uncompressed input: slowest ${slowest.mbps.toFixed(0)} MB/s (${slowest.r.image} ${slowest.f}) — ${met(slowest.mbps >= TARGETS.writerMBps)} (dd writes that image's ext4 at ${sums[slowest.r.image]!["diskImage.MBps"]!.toFixed(0)} MB/s of input)`,
    `warm pull ≤ ${TARGETS.warmSeconds} s: slowest ${secs(warm)} — ${met(warm <= TARGETS.warmSeconds)} (node -e 0 alone: ${secs(nodeStart)})`,
    big
      ? `peak RSS ≤ ${TARGETS.rssMB} MB on the ${mb(big.uncompressed)} image: ${rss.toFixed(0)} MB — ${met(rss <= TARGETS.rssMB)}`
      : "peak RSS on the ≥ 1 GB image: not measured (image not in BENCH_IMAGES)",
  ];
}

/** The generated many-entries image: one run (peak RSS hardly varies), each format. */
function entriesReport(e: EntriesResult): string[] {
  const perEntry = (rssMB: number) => `${((rssMB * 1000) / e.files).toFixed(2)} KB`;
  return [
    `Memory per entry (${e.files.toLocaleString("en")} one-line files in ${e.dirs.toLocaleString("en")} directories, ` +
      `a ${mb(e.tarBytes)} tar generated in ${secs(e.generateSeconds)}, image by umoci in ${secs(e.imageSeconds)}; one run)`,
    table([
      ["", "seconds", "peak RSS", "per entry"],
      ...Object.entries(e.export).map(([f, x]) => [
        `kiln export → ${f}`,
        secs(x.seconds),
        `${x.rssMB.toFixed(0)} MB`,
        perEntry(x.rssMB),
      ]),
    ]),
  ];
}

function entriesTarget(e: EntriesResult): string {
  const [format, worst] = Object.entries(e.export).reduce((a, b) => (b[1].rssMB > a[1].rssMB ? b : a));
  return `${e.files.toLocaleString("en")} files ≤ ${ENTRIES_GOAL.rssMB} MB peak RSS (kiln export): worst ${worst.rssMB.toFixed(0)} MB (${format}, ${((worst.rssMB * 1000) / e.files).toFixed(2)} KB per entry) — ${worst.rssMB <= ENTRIES_GOAL.rssMB ? "met" : "NOT met"}`;
}

function compare(file: string, sums: Record<string, Record<string, number>>): string[] {
  const old = JSON.parse(readFileSync(file, "utf8")) as { summary: Record<string, Record<string, number>> };
  const rows = [["figure", "before", "now", "now/before"]];
  for (const [image, figures] of Object.entries(sums)) {
    for (const [k, v] of Object.entries(figures)) {
      const was = old.summary[image]?.[k];
      if (was === undefined) continue;
      rows.push([`${image} ${k}`, was.toPrecision(4), v.toPrecision(4), ratio(v / was)]);
    }
  }
  return [`Compared with ${file}`, table(rows)];
}

async function main() {
  const compareAt = process.argv.indexOf("--compare");
  const compareFile = compareAt >= 0 ? process.argv[compareAt + 1] : undefined;
  const log = (s: string) => process.stderr.write(`bench: ${s}\n`);
  if (!process.env.KILN_BENCH_NO_BUILD) sh("npm", ["run", "build", "--silent"]);
  mkdirSync(work, { recursive: true });
  // BENCH_IMAGES=entries needs no fixture.
  const fixtures =
    ONLY?.every((n) => n === "entries") === true
      ? []
      : (await ensureFixtures(join(REPO_ROOT, "bench", ".cache"), log)).filter(
          (f) => !ONLY || ONLY.includes(f.name),
        );
  const registry = await startRegistry();
  try {
    log("pushing the fixtures to a fresh registry");
    const refs = pushFixtures(fixtures, registry.host);
    const all: ImageResults[] = [];
    for (const f of fixtures) all.push(await benchImage(f, refs.get(f.name)!, registry.host, log));
    const base = fixtures.find((f) => f.name === "debian");
    if (base) {
      for (const r of all) {
        if (r.image === base.name) continue;
        log(`${r.image}: bytes downloaded on top of ${base.name}`);
        try {
          r.shared = await sharedBase(base, fixtures.find((f) => f.name === r.image)!, refs, registry.host);
        } catch (err) {
          // The figures already measured still count.
          log(`${r.image}: bytes downloaded not measured: ${(err as Error).message.split("\n")[0]}`);
        }
      }
    }
    const entries =
      !ONLY || ONLY.includes("entries")
        ? await benchEntries(join(work, "entries"), KILN, FORMATS, log)
        : undefined;
    const sums = Object.fromEntries(all.map((r) => [r.image, summarize(r)]));
    if (entries) {
      sums.entries = { importRssMB: entries.importRssMB, import: entries.importSeconds };
      for (const [f, x] of Object.entries(entries.export)) {
        sums.entries[`export.${f}`] = x.seconds;
        sums.entries[`export.${f}.rssMB`] = x.rssMB;
      }
    }
    const lines = [
      `kiln bench, ${new Date().toISOString()}, ${availableParallelism()} cores, node ${process.version}, ${RUNS} run(s)`,
      ...(all.length ? ["", ...report(all, sums)] : []),
      ...(entries ? ["", ...entriesReport(entries)] : []),
      "",
      "Targets",
      ...(all.length ? targets(all, sums) : []),
      ...(entries ? [entriesTarget(entries)] : []),
    ];
    if (compareFile) lines.push("", ...compare(compareFile, sums));
    console.log(lines.join("\n"));
    mkdirSync(resultsDir, { recursive: true });
    const json = JSON.stringify(
      { date: new Date().toISOString(), runs: RUNS, summary: sums, raw: all, entries },
      null,
      2,
    );
    const file = join(resultsDir, `${new Date().toISOString().replace(/[:.]/g, "-")}.json`);
    writeFileSync(file, json);
    writeFileSync(join(resultsDir, "latest.json"), json);
    log(`results in ${file}`);
  } finally {
    await registry.stop();
    rmSync(work, { recursive: true, force: true });
  }
}

await main();
