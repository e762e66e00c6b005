/**
 * bench/fixtures: real images the benchmarks share, built once into a cache directory and reused.
 *
 * - debian: `debootstrap --variant=minbase bookworm`, one gzip layer.
 * - multi:  the same base blob plus three layers of this machine's files (python, /usr/bin, data),
 *           gzip like the rest: umoci 0.4.7, the reference pipeline, cannot read zstd layers.
 * - big:    the same base blob, a layer of tens of thousands of small files and a layer of five
 *           100–140 MiB files; at least 1 GB uncompressed.
 *
 * Each also exists with every layer uncompressed (`raw`). Layouts are written by hand (not umoci) so
 * the debian blob is byte-identical in all three images: a registry and kiln then share it, as they
 * share a real base image. A fixture counts as built only once `CACHE/NAME.json` exists; that file is
 * renamed into place last, so an interrupted build is redone, never trusted.
 */
import { spawn } from "node:child_process";
import { createHash } from "node:crypto";
import { once } from "node:events";
import { createReadStream, createWriteStream, existsSync, readFileSync, statSync } from "node:fs";
import { chmod, link, mkdir, open, readdir, rename, rm, stat, utimes, writeFile } from "node:fs/promises";
import { join, relative, resolve } from "node:path";
import { finished } from "node:stream/promises";
import { acquirePidLock } from "../src/build/lock.js";
import { MEDIA } from "../test/helpers/images.js";

export interface FixtureLayer {
  digest: string;
  size: number;
  diffId: string;
  mediaType: string;
  uncompressed: number;
}

export interface Fixture {
  name: "debian" | "multi" | "big";
  /** OCI layout dir and the tag of its one image (skopeo's `oci:DIR:TAG`). */
  layout: string;
  tag: string;
  layers: FixtureLayer[];
  /** Sum of the layers' uncompressed tar sizes, and regular files in them. */
  uncompressed: number;
  files: number;
  /** The same image with every layer stored uncompressed (mediaType ...image.layer.v1.tar). */
  raw: { layout: string; tag: string };
}

/** Bump when a recipe below changes: fixtures recorded under another number are rebuilt. */
const RECIPE = 1;
const TAG = "latest";
const NAMES = ["debian", "multi", "big"] as const;
type Name = (typeof NAMES)[number];
const CREATED = "2024-01-01T00:00:00Z";
/** mtime of the generated /opt/data files, so the big layer's tar does not depend on build time. */
const FIXED_TIME = new Date(CREATED);
const MiB = 1 << 20;
const BIG_MIN = 1e9;

/** Layers of real files from this machine, so compression ratios and file-size mixes are realistic. */
const MULTI_LAYERS: string[][] = [
  ["usr/lib/python3.11"],
  ["usr/bin"],
  ["usr/share/perl", "usr/share/zoneinfo", "usr/share/mime"],
];
const BIG_SMALL_FILES = ["usr/share", "usr/include"];
const BIG_FILE_SIZES = [100, 110, 120, 130, 140].map((m) => m * MiB);

// GNU tar, deterministic: sorted entries and no atime/ctime (they change on every read, so two
// builds from the same files would differ). Per-file PAX headers still carry subsecond mtimes.
const TAR_FLAGS = [
  "--format=pax",
  "--sort=name",
  "--numeric-owner",
  "--xattrs",
  "--xattrs-include=*",
  "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime",
];

type Compression = "gzip" | "zstd";
const COMPRESSORS: Record<Compression, { cmd: string; args: string[]; mediaType: string }> = {
  // -n: no name or mtime in the gzip header; -6 is docker's default level.
  gzip: { cmd: "gzip", args: ["-n", "-6", "-c"], mediaType: MEDIA.OCI_LAYER_GZIP },
  zstd: { cmd: "zstd", args: ["-3", "-q", "-c"], mediaType: MEDIA.OCI_LAYER_ZSTD },
};

/** What `CACHE/NAME.json` holds; layout paths in it are relative to the cache directory. */
interface Marker {
  recipe: number;
  builtAt: string;
  seconds: number;
  fixture: Fixture;
}

/** The three fixtures, built into `cacheDir` on the first call (minutes) and read back afterwards. */
export async function ensureFixtures(cacheDir: string, log: (line: string) => void): Promise<Fixture[]> {
  const cache = resolve(cacheDir);
  const ready = loadAll(cache);
  if (ready) return ready;

  await mkdir(cache, { recursive: true });
  const unlock = await lock(cache);
  try {
    const out: Fixture[] = [];
    let base: Fixture | undefined;
    for (const name of NAMES) {
      let f = load(cache, name, base);
      if (!f) {
        const t0 = performance.now();
        log(`fixtures: building ${name} in ${join(cache, name)}`);
        f = await build(cache, name, base, log);
        const seconds = (performance.now() - t0) / 1000;
        await saveMarker(cache, f, seconds);
        log(`fixtures: ${name}: ${describe(f)}, built in ${seconds.toFixed(0)} s`);
      }
      if (name === "debian") base = f;
      out.push(f);
    }
    return out;
  } finally {
    unlock();
  }
}

function describe(f: Fixture): string {
  const size = f.layers.reduce((s, l) => s + l.size, 0);
  const mb = (n: number) => `${(n / 1e6).toFixed(1)} MB`;
  const n = f.layers.length;
  return `${n} layer${n === 1 ? "" : "s"}, ${mb(size)} compressed, ${mb(f.uncompressed)} uncompressed, ${f.files} files`;
}

// ---------------------------------------------------------------------------------------------
// Reading the cache (the fast path: a few small reads and stats)

function loadAll(cache: string): Fixture[] | undefined {
  const out: Fixture[] = [];
  let base: Fixture | undefined;
  for (const name of NAMES) {
    const f = load(cache, name, base);
    if (!f) return undefined;
    if (name === "debian") base = f;
    out.push(f);
  }
  return out;
}

/** The recorded fixture when its marker, layouts and layer blobs are all there; else undefined. */
function load(cache: string, name: Name, base: Fixture | undefined): Fixture | undefined {
  let marker: Marker;
  try {
    marker = JSON.parse(readFileSync(markerPath(cache, name), "utf8")) as Marker;
  } catch {
    return undefined;
  }
  if (marker.recipe !== RECIPE || marker.fixture?.name !== name) return undefined;
  const rel = marker.fixture;
  const f: Fixture = {
    ...rel,
    layout: join(cache, rel.layout),
    raw: { ...rel.raw, layout: join(cache, rel.raw.layout) },
  };
  // multi and big hold hard links to debian's blob: a rebuilt debian means rebuilding them too.
  if (base && f.layers[0]?.digest !== base.layers[0]?.digest) return undefined;
  for (const dir of [f.layout, f.raw.layout]) if (!existsSync(join(dir, "index.json"))) return undefined;
  for (const l of f.layers) {
    if (blobSize(f.layout, l.digest) !== l.size) return undefined;
    if (blobSize(f.raw.layout, l.diffId) !== l.uncompressed) return undefined;
  }
  return f;
}

function blobSize(layout: string, digest: string): number | undefined {
  try {
    return statSync(blobPath(layout, digest)).size;
  } catch {
    return undefined;
  }
}

const markerPath = (cache: string, name: Name) => join(cache, `${name}.json`);
const blobPath = (layout: string, digest: string) => join(layout, "blobs", "sha256", digest.slice(7));

async function saveMarker(cache: string, f: Fixture, seconds: number): Promise<void> {
  const marker: Marker = {
    recipe: RECIPE,
    builtAt: new Date().toISOString(),
    seconds: Math.round(seconds),
    fixture: {
      ...f,
      layout: relative(cache, f.layout),
      raw: { ...f.raw, layout: relative(cache, f.raw.layout) },
    },
  };
  const file = markerPath(cache, f.name);
  const tmp = `${file}.tmp-${process.pid}`;
  await writeFile(tmp, `${JSON.stringify(marker, null, 2)}\n`);
  // The marker vouches for the blobs: after a crash it must not be on disk without them.
  await run("sync", []);
  await rename(tmp, file);
}

/** One builder per cache directory; a lock left by a dead process is taken over. */
async function lock(cache: string): Promise<() => void> {
  const held = await acquirePidLock(
    join(cache, ".lock"),
    (pid) =>
      new Error(`fixtures: process ${pid} is building fixtures in ${cache} (lock ${join(cache, ".lock")})`),
  );
  return () => held.release();
}

// ---------------------------------------------------------------------------------------------
// Building

/** A layer built so far: its tar and compressed blob, still in the work directory. */
interface Built extends FixtureLayer {
  files: number;
  tarFile: string;
  blobFile: string;
}

async function build(cache: string, name: Name, base: Fixture | undefined, log: (line: string) => void) {
  await rm(markerPath(cache, name), { force: true });
  const dir = join(cache, name);
  await removeTree(dir);
  const work = join(dir, "work");
  await mkdir(work, { recursive: true });

  const layers: Promise<Built>[] = [];
  // Compression of one layer overlaps the making of the next tar (2 cores here).
  const add = (tarFile: string, compression: Compression) => {
    const p = finishLayer(tarFile, compression);
    p.catch(() => {}); // awaited below; this only keeps an early failure from going unhandled
    layers.push(p);
  };
  let shared: FixtureLayer | undefined;
  try {
    shared = await makeLayers(name, base, work, add, log);
  } catch (err) {
    // Let compressors already started finish before the caller releases the lock.
    await Promise.allSettled(layers);
    throw err;
  }
  const own = await Promise.all(layers);
  return assemble(name, dir, work, base, shared, own);
}

/** Makes the fixture's own layer tars (handing each to `add`); returns the shared debian layer, if any. */
async function makeLayers(
  name: Name,
  base: Fixture | undefined,
  work: string,
  add: (tarFile: string, compression: Compression) => void,
  log: (line: string) => void,
): Promise<FixtureLayer | undefined> {
  let shared: FixtureLayer | undefined;
  if (name === "debian") {
    const rootfs = join(work, "rootfs");
    log("fixtures: debootstrap --variant=minbase bookworm (downloads about 40 MB; a minute or two)");
    await run("debootstrap", ["--variant=minbase", "bookworm", rootfs, "http://deb.debian.org/debian"]);
    const mounts = mountsUnder(rootfs);
    if (mounts.length) throw new Error(`fixtures: debootstrap left mounts behind: ${mounts.join(", ")}`);
    // As Debian's official images do: no downloaded .debs (30 MB) or package lists (50 MB).
    await removeEntries(join(rootfs, "var/cache/apt/archives"), (n) => n.endsWith(".deb"));
    await removeEntries(join(rootfs, "var/lib/apt/lists"), (n) => n !== "partial" && n !== "lock");
    const tarFile = join(work, "layer-0.tar");
    const top = (await readdir(rootfs)).sort();
    // Entries as docker writes them ("etc/passwd", not "./etc/passwd"); --one-file-system in case.
    await run("tar", ["-C", rootfs, ...TAR_FLAGS, "--one-file-system", "-cf", tarFile, ...top]);
    await removeTree(rootfs);
    add(tarFile, "gzip");
  } else {
    if (!base) throw new Error("fixtures: the debian fixture must be built first");
    shared = base.layers[0]!;
  }

  if (name === "multi") {
    for (const [i, paths] of MULTI_LAYERS.entries()) {
      const tarFile = join(work, `layer-${i + 1}.tar`);
      log(`fixtures: multi layer ${i + 1}: ${paths.map((p) => `/${p}`).join(" ")}`);
      await tarFromRoot(tarFile, paths);
      add(tarFile, "gzip");
    }
  }

  if (name === "big") {
    log(`fixtures: big layer 1: ${BIG_SMALL_FILES.map((p) => `/${p}`).join(" ")}`);
    const smallTar = join(work, "layer-1.tar");
    await tarFromRoot(smallTar, BIG_SMALL_FILES);
    add(smallTar, "gzip");

    log(`fixtures: big layer 2: ${BIG_FILE_SIZES.length} files in /opt/data made from /usr/lib's files`);
    const stage = join(work, "stage");
    const data = join(stage, "opt", "data");
    await mkdir(data, { recursive: true });
    const parts = BIG_FILE_SIZES.map((_, i) => join(data, `part-${i}.bin`));
    await concatInto(await libFiles(), parts, BIG_FILE_SIZES);
    for (const p of parts) await chmod(p, 0o644);
    for (const d of [join(stage, "opt"), data]) await chmod(d, 0o755);
    for (const p of [...parts, data, join(stage, "opt")]) await utimes(p, FIXED_TIME, FIXED_TIME);
    const bigTar = join(work, "layer-2.tar");
    await run("tar", ["-C", stage, ...TAR_FLAGS, "--owner=0", "--group=0", "-cf", bigTar, "opt"]);
    await rm(stage, { recursive: true, force: true });
    add(bigTar, "gzip");
  }
  return shared;
}

/** Moves the blobs into the two layouts, writes their images, and checks big's size. */
async function assemble(
  name: Name,
  dir: string,
  work: string,
  base: Fixture | undefined,
  shared: FixtureLayer | undefined,
  own: Built[],
): Promise<Fixture> {
  const layout = join(dir, "oci");
  const rawLayout = join(dir, "raw");
  for (const l of [layout, rawLayout]) {
    await mkdir(join(l, "blobs", "sha256"), { recursive: true });
    await writeFile(join(l, "oci-layout"), JSON.stringify({ imageLayoutVersion: "1.0.0" }));
  }
  if (shared && base) {
    // The very same files as debian's: identical digests, no extra disk.
    await link(blobPath(base.layout, shared.digest), blobPath(layout, shared.digest));
    await link(blobPath(base.raw.layout, shared.diffId), blobPath(rawLayout, shared.diffId));
  }
  for (const l of own) {
    await rename(l.blobFile, blobPath(layout, l.digest));
    await rename(l.tarFile, blobPath(rawLayout, l.diffId));
  }
  await rm(work, { recursive: true, force: true });

  const all: FixtureLayer[] = [
    ...(shared ? [shared] : []),
    ...own.map(({ digest, size, diffId, mediaType, uncompressed }) => ({
      digest,
      size,
      diffId,
      mediaType,
      uncompressed,
    })),
  ];
  const uncompressed = all.reduce((s, l) => s + l.uncompressed, 0);
  const files = (shared && base ? base.files : 0) + own.reduce((s, l) => s + l.files, 0);
  if (name === "big" && uncompressed < BIG_MIN)
    throw new Error(
      `fixtures: big is only ${(uncompressed / 1e6).toFixed(0)} MB uncompressed (needs ≥ ${BIG_MIN / 1e6} MB): ` +
        `this machine has too little under ${BIG_SMALL_FILES.map((p) => `/${p}`).join(", ")} and /usr/lib`,
    );

  const config = Buffer.from(
    JSON.stringify({
      created: CREATED,
      architecture: hostArch(),
      os: "linux",
      config: {
        Env: ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        Cmd: ["/bin/sh"],
      },
      rootfs: { type: "layers", diff_ids: all.map((l) => l.diffId) },
      history: all.map((_, i) => ({ created: CREATED, created_by: `kiln bench fixture ${name} layer ${i}` })),
    }),
  );
  await writeImage(layout, config, all);
  await writeImage(
    rawLayout,
    config,
    all.map((l) => ({ ...l, mediaType: MEDIA.OCI_LAYER, digest: l.diffId, size: l.uncompressed })),
  );

  const fixture: Fixture = {
    name,
    layout,
    tag: TAG,
    layers: all,
    uncompressed,
    files,
    raw: { layout: rawLayout, tag: TAG },
  };
  return fixture;
}

/** A tar of paths under / (missing ones skipped, so the bench still runs on other machines). */
async function tarFromRoot(tarFile: string, paths: string[]): Promise<void> {
  await run("tar", ["-C", "/", ...TAR_FLAGS, "--ignore-failed-read", "-cf", tarFile, ...paths]);
}

async function removeEntries(dir: string, pick: (name: string) => boolean): Promise<void> {
  for (const n of await readdir(dir)) if (pick(n)) await rm(join(dir, n), { recursive: true });
}

/** Hashes and compresses a finished tar (side by side) and counts its regular files. */
async function finishLayer(tarFile: string, compression: Compression): Promise<Built> {
  const c = COMPRESSORS[compression];
  const blobFile = `${tarFile}.${compression}`;
  const [diffHex, files] = await Promise.all([
    sha256(tarFile),
    countFiles(tarFile),
    run(c.cmd, [...c.args, tarFile], { stdoutFile: blobFile }),
  ]);
  const hex = await sha256(blobFile);
  return {
    digest: `sha256:${hex}`,
    size: (await stat(blobFile)).size,
    diffId: `sha256:${diffHex}`,
    mediaType: c.mediaType,
    uncompressed: (await stat(tarFile)).size,
    files,
    tarFile,
    blobFile,
  };
}

/** Regular-file entries ("-" in `tar -tv`); hard links ("h") are names of files already counted. */
async function countFiles(tarFile: string): Promise<number> {
  const listing = await run("tar", ["-tvf", tarFile], { maxBuffer: 1 << 30 });
  let n = 0;
  for (const line of listing.split("\n")) if (line.startsWith("-")) n++;
  return n;
}

async function sha256(file: string): Promise<string> {
  const out = await run("sha256sum", ["-b", file]);
  const hex = out.slice(0, 64);
  if (!/^[0-9a-f]{64}$/.test(hex)) throw new Error(`fixtures: sha256sum ${file}: unexpected output ${out}`);
  return hex;
}

/** Writes config, manifest, and an index.json naming the manifest TAG. */
async function writeImage(layout: string, config: Buffer, layers: FixtureLayer[]): Promise<void> {
  const put = async (mediaType: string, bytes: Buffer) => {
    const hex = createHash("sha256").update(bytes).digest("hex");
    await writeFile(join(layout, "blobs", "sha256", hex), bytes);
    return { mediaType, digest: `sha256:${hex}`, size: bytes.length };
  };
  const manifest = await put(
    MEDIA.OCI_MANIFEST,
    Buffer.from(
      JSON.stringify({
        schemaVersion: 2,
        mediaType: MEDIA.OCI_MANIFEST,
        config: await put(MEDIA.OCI_CONFIG, config),
        layers: layers.map((l) => ({ mediaType: l.mediaType, digest: l.digest, size: l.size })),
      }),
    ),
  );
  await writeFile(
    join(layout, "index.json"),
    JSON.stringify({
      schemaVersion: 2,
      mediaType: MEDIA.OCI_INDEX,
      manifests: [{ ...manifest, annotations: { "org.opencontainers.image.ref.name": TAG } }],
    }),
  );
}

function hostArch(): string {
  const arches: Record<string, string> = { x64: "amd64", arm64: "arm64", arm: "arm", ppc64: "ppc64le" };
  return arches[process.arch] ?? process.arch;
}

/** Regular files under /usr/lib, the multiarch library directory first, each part in path order. */
async function libFiles(): Promise<string[]> {
  const entries = await readdir("/usr/lib", { recursive: true, withFileTypes: true });
  const files = entries.filter((e) => e.isFile()).map((e) => join(e.parentPath, e.name));
  const multiarch = /^\/usr\/lib\/[a-z0-9_]+-linux-gnu[a-z]*\//;
  const rank = (p: string) => (multiarch.test(p) ? 0 : 1);
  return files.sort((a, b) => rank(a) - rank(b) || (a < b ? -1 : a > b ? 1 : 0));
}

/**
 * Fills `outputs` (of `sizes` bytes each) with the bytes of `sources`, one after another: real
 * binaries and libraries, so the files compress as real data does. Streams, 1 MiB at a time.
 */
async function concatInto(sources: string[], outputs: string[], sizes: number[]): Promise<void> {
  async function* bytes() {
    for (const src of sources) yield* createReadStream(src, { highWaterMark: MiB }) as AsyncIterable<Buffer>;
  }
  const it = bytes();
  let carry: Buffer | undefined;
  try {
    for (const [i, out] of outputs.entries()) {
      const ws = createWriteStream(out);
      let left = sizes[i]!;
      while (left > 0) {
        let chunk = carry;
        carry = undefined;
        if (!chunk) {
          const next = await it.next();
          if (next.done) throw new Error(`fixtures: /usr/lib has too few bytes to fill ${out}`);
          chunk = next.value;
        }
        if (chunk.length > left) {
          carry = chunk.subarray(left);
          chunk = chunk.subarray(0, left);
        }
        left -= chunk.length;
        if (!ws.write(chunk)) await once(ws, "drain");
      }
      ws.end();
      await finished(ws);
    }
  } finally {
    await it.return(undefined);
  }
}

/**
 * Removes a directory that may hold a debootstrap target an interrupted build left behind:
 * debootstrap bind-mounts /dev entries and mounts proc and sys there, so unmount first, and never
 * cross into another filesystem.
 */
async function removeTree(dir: string): Promise<void> {
  for (const m of mountsUnder(dir).reverse()) await run("umount", ["-l", m]);
  if (existsSync(dir)) await run("rm", ["-rf", "--one-file-system", dir]);
}

/** Mount points at or below `dir`, outermost first. */
function mountsUnder(dir: string): string[] {
  const mounts = readFileSync("/proc/self/mounts", "utf8")
    .split("\n")
    .map((line) =>
      (line.split(" ")[1] ?? "").replace(/\\([0-7]{3})/g, (_, o) => String.fromCharCode(parseInt(o, 8))),
    )
    .filter((m) => m === dir || m.startsWith(`${dir}/`));
  return mounts.sort((a, b) => a.length - b.length);
}

interface RunOptions {
  /** Send stdout to this file instead of returning it. */
  stdoutFile?: string;
  maxBuffer?: number;
}

/** Runs a command; a failure (any non-zero status, tar's "file changed" included) throws with its stderr. */
async function run(cmd: string, args: string[], opts: RunOptions = {}): Promise<string> {
  const out = opts.stdoutFile ? await open(opts.stdoutFile, "w") : undefined;
  try {
    const child = spawn(cmd, args, { stdio: ["ignore", out ? out.fd : "pipe", "pipe"] });
    const stdout: Buffer[] = [];
    let stdoutLen = 0;
    let stderr = "";
    child.stdout?.on("data", (b: Buffer) => {
      stdoutLen += b.length;
      if (stdoutLen > (opts.maxBuffer ?? 64 * MiB)) child.kill();
      else stdout.push(b);
    });
    child.stderr!.on("data", (b: Buffer) => {
      stderr = (stderr + b.toString()).slice(-4000);
    });
    const [code, signal] = (await once(child, "close")) as [number | null, NodeJS.Signals | null];
    if (code !== 0) {
      const why = signal ? `signal ${signal}` : `status ${code}`;
      // debootstrap reports its errors on stdout.
      const text = stderr.trim() || Buffer.concat(stdout).toString("utf8").trim();
      const tail = text.split("\n").slice(-8).join(" | ");
      throw new Error(`fixtures: ${cmd} ${args.join(" ")} failed (${why}): ${tail}`);
    }
    return Buffer.concat(stdout).toString("utf8");
  } finally {
    await out?.close();
  }
}
