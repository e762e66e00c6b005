/**
 * Image → filesystem. Pass 1 reads each layer's tar headers (decompressing a compressed layer and
 * checking its diff ID) and merges them into one tree (or one tree per layer); pass 2 reads file
 * bytes from the same open layer files again, in layer order, into the writer (src/layers/files.ts:
 * an uncompressed layer is read by position, so neither pass reads what it does not need). The
 * result is published into the store's artifact cache (temp file, fsync, rename, then recorded),
 * keyed by (manifest digest, format, options), so the same export again is a copy (or a clone).
 */
import { createHash, randomBytes } from "node:crypto";
import { constants } from "node:fs";
import { copyFile, mkdir, open, readdir, readFile, rename, rm, stat } from "node:fs/promises";
import { freemem } from "node:os";
import { dirname, join, relative, resolve } from "node:path";
import { KilnError } from "../errors.js";
import { type DroppedXattrs, writeCpio } from "../fs/cpio/writer.js";
import { openDirect, type Sink, writeSparse } from "../fs/datastream.js";
import { writeErofs } from "../fs/erofs/writer.js";
import { writeExt4 } from "../fs/ext4/writer.js";
import { Staging } from "../fs/staging.js";
import type { ContentSource, Inode } from "../fs/tree.js";
import { LayerContent } from "../layers/content.js";
import { LayerFiles } from "../layers/files.js";
import { type LayerEntry, openLayerTree, TreeBuilder } from "../layers/merge.js";
import { HeaderPrefetch } from "../layers/prefetch.js";
import { pageAligned } from "../read-buffer.js";
import { fsyncPath } from "../store/blobs.js";
import type { ArtifactRecord, ImageRecord } from "../store/catalog.js";
import type { Store } from "../store/store.js";
import { readTar } from "../tar/reader.js";
import { EXPORT_FORMATS, type ExportFormat } from "./formats.js";
import { replaceAtomically } from "./publish.js";

export interface ExportOptions {
  format: ExportFormat;
  /** cpio: compress the archive. */
  compress?: "gzip" | "none" | undefined;
  /** ext4: exact size in bytes (too small → TOO_LARGE naming the size needed). */
  size?: number | undefined;
  /** ext4: free space (and inodes) beyond the default headroom, for writable disks. */
  free?: number | undefined;
  /** ext4: add a jbd2 journal, for disks mounted read-write. */
  journal?: boolean | undefined;
}

/** Directories a tar does not list are created with this time (the epoch), so output never depends on the clock. */
export const IMPLICIT_DIR_TIME = 0;

/** The options that change the output, in a fixed order: part of the cache key. */
export function canonicalOptions(opts: ExportOptions): string {
  switch (opts.format) {
    case "cpio":
      return JSON.stringify({ format: opts.format, compress: opts.compress ?? "none" });
    case "ext4":
      return JSON.stringify({
        format: opts.format,
        size: opts.size ?? null,
        free: opts.free ?? 0,
        journal: opts.journal ?? false,
      });
    case "erofs":
    case "erofs-layers":
      return JSON.stringify({ format: opts.format });
  }
}

/**
 * 16 bytes derived from the manifest digest and a purpose, so the same image gives the same
 * filesystem UUID and hash seed every time (reproducible output), and different images differ.
 */
export function derivedId(manifestDigest: string, purpose: string): Buffer {
  const id = createHash("sha256").update(`kiln:${purpose}:${manifestDigest}`).digest().subarray(0, 16);
  // Shaped as an RFC 4122 version 4 UUID, as tools that show it expect.
  id[6] = (id[6]! & 0x0f) | 0x40;
  id[8] = (id[8]! & 0x3f) | 0x80;
  return id;
}

export function artifactKey(image: ImageRecord, opts: ExportOptions): { key: string; options: string } {
  const options = canonicalOptions(opts);
  const key = createHash("sha256").update(`${image.manifestDigest}\n${options}\n`).digest("hex");
  return { key, options };
}

function layerLabel(image: ImageRecord, i: number): string {
  return `layer ${i + 1}/${image.layers.length} (${image.layers[i]!.digest})`;
}

/** What a conversion is doing: pass 1, pass 2, or the copy of the result to its output. */
export type ExportPhase = "reading" | "writing" | "copying";

/**
 * What a long export reports, for progress bars and logs. Every callback is optional; without
 * them nothing is counted.
 */
export interface ExportProgress {
  /** Once, first: the layers (compressed sizes) and whether the result comes from the cache. */
  start?(plan: { format: ExportFormat; layers: { digest: string; size: number }[]; cached: boolean }): void;
  /**
   * A phase begins. `total` is what its `bytes` add up to: the compressed bytes of the layers when
   * reading or writing (each pass reads every layer; erofs-layers reads and writes one layer at a
   * time, so it has a single "writing" phase over both reads), the result's size when copying.
   */
  phase?(phase: ExportPhase, total: number): void;
  /** The phase moved on to layer `index` (0-based) of `count`. */
  layer?(index: number, count: number): void;
  /** `n` more bytes of the phase are done; they add up to the phase's total when it ends. */
  bytes?(n: number): void;
  /** The phase is over (its bytes reached its total). */
  phaseEnd?(phase: ExportPhase): void;
}

/** Phase bookkeeping over an optional ExportProgress: a phase's bytes always end at its total. */
class Reporter {
  #phase: ExportPhase | undefined;
  #total = 0;
  #done = 0;
  readonly onBytes: ((n: number) => void) | undefined;

  constructor(private readonly p: ExportProgress | undefined) {
    this.onBytes = p?.bytes
      ? (n) => {
          this.#done += n;
          p.bytes!(n);
        }
      : undefined;
  }

  phase(phase: ExportPhase, total: number): void {
    this.end();
    this.#phase = phase;
    this.#total = total;
    this.#done = 0;
    this.p?.phase?.(phase, total);
  }

  layer(index: number, count: number): void {
    this.p?.layer?.(index, count);
  }

  /** Ends the phase: what it did not need to read (layers with no file left) counts as done. */
  end(): void {
    const phase = this.#phase;
    if (phase === undefined) return;
    if (this.#done < this.#total) this.onBytes?.(this.#total - this.#done);
    this.#phase = undefined;
    this.#total = this.#done = 0;
    this.p?.phaseEnd?.(phase);
  }
}

/**
 * Decompressed bytes pass 1 may keep in temp files for pass 2 (src/layers/files.ts): a tenth of the
 * memory available now, at most 4 GiB. The kernel starts writing dirty pages back at a tenth of the
 * memory it could use for them (vm.dirty_background_ratio), so the spools stay in the page cache and
 * are gone before they reach the disk; the images and blobs beside them add few dirty pages (O_DIRECT,
 * written back as they come). A layer beyond the budget is decompressed a second time in pass 2,
 * which on a 1.5 GB image costs more than a second.
 */
function spoolBudget(): number {
  return Math.min(freemem() / 10, 4 * 1024 ** 3);
}

/** A fresh temp path in the store, named for what it is (GC removes stale ones by age). */
function tempIn(store: Store, what: string): string {
  return join(store.tmpDir, `${what}-${process.pid}-${randomBytes(4).toString("hex")}`);
}

/** A pull's pass 1, staging ext4 file data where it can. */
export type ExportPrefetch = HeaderPrefetch<Staging>;

/** The temp file an export to `output` is written as (renamed over it once complete). */
function outputTemp(output: string): string {
  return join(dirname(resolve(output)), `.${randomBytes(6).toString("hex")}.kiln-tmp`);
}

/**
 * Pass 1 of an export of `format`, to run on each layer while a pull downloads it (hand its `tap` to
 * the pull, then the prefetch to exportArtifact with the same `output`, and close it after). None
 * for erofs-layers, which reads each layer beside writing it. For ext4 the file data is staged in
 * the image's own temp file as it is read (src/fs/staging.ts), where the filesystem allows.
 */
export function prefetchFor(
  store: Store,
  format: ExportFormat,
  output?: string | undefined,
): ExportPrefetch | undefined {
  if (format === "erofs-layers") return undefined;
  return new HeaderPrefetch<Staging>({
    spoolPrefix: tempIn(store, "prefetch"),
    spoolBudget: spoolBudget(),
    builder: new TreeBuilder({ fixedTime: IMPLICIT_DIR_TIME }),
    stager:
      format === "ext4" && process.env.KILN_NO_STAGING === undefined
        ? (layers) =>
            Staging.create(output === undefined ? tempIn(store, "stage") : outputTemp(output), layers)
        : undefined,
  });
}

/** The prefetch's staged image file, if it is where this export writes (its directory). */
async function stagingFor(
  store: Store,
  opts: ExportOptions,
  extras: ExportExtras,
): Promise<Staging | undefined> {
  if (opts.format !== "ext4") return undefined;
  const staging = await extras.prefetch?.stager;
  if (!staging) return undefined;
  const dir = extras.output === undefined ? store.tmpDir : dirname(resolve(extras.output));
  return dirname(staging.path) === dir ? staging : undefined;
}

/** Layers whose headers pass 1 reads at once (two cores: one big layer and the small ones beside it). */
const PASS1_AHEAD = 2;

/** Pass 1: every layer's tar headers merged into one tree (whiteouts applied). */
async function mergedTree(
  files: LayerFiles,
  image: ImageRecord,
  report: Reporter,
  prefetch: HeaderPrefetch | undefined,
): Promise<Inode> {
  // The prefetch's builder holds the layers it merged during the pull; the rest go on top here.
  const builder = prefetch?.builder ?? new TreeBuilder({ fixedTime: IMPLICIT_DIR_TIME });
  // Layers are read PASS1_AHEAD at a time while the finished ones merge in order: gzip inflates on
  // the thread pool, so a small layer is read beside a big one instead of after it. Only headers
  // are kept.
  const reads: Promise<LayerEntry[] | "merged">[] = [];
  const read = (i: number) => {
    if (i >= image.layers.length) return;
    const p = layerHeaders(files, image, i, report, prefetch);
    // Awaited later; until then a failure must not count as unhandled.
    p.catch(() => {});
    reads[i] = p;
  };
  for (let i = 0; i < PASS1_AHEAD; i++) read(i);
  for (let i = 0; i < image.layers.length; i++) {
    report.layer(i, image.layers.length);
    const entries = await reads[i]!;
    delete reads[i];
    read(i + PASS1_AHEAD);
    if (entries !== "merged") await builder.addLayer(i, entries);
  }
  return builder.finish();
}

/**
 * One layer's entries without their data (a compressed layer read and verified to the end), or
 * "merged" when the prefetch merged it already.
 */
async function layerHeaders(
  files: LayerFiles,
  image: ImageRecord,
  i: number,
  report: Reporter,
  prefetch: HeaderPrefetch | undefined,
): Promise<LayerEntry[] | "merged"> {
  const pre = prefetch?.take(image.layers[i]!.digest);
  if (pre) {
    // Read during the pull: only its spool (if any) is left to take over.
    const { entries, spool, merged } = await pre;
    if (spool) files.adoptSpool(i, spool);
    report.onBytes?.(image.layers[i]!.size);
    if (merged === undefined) return entries;
    if (merged !== i) throw new KilnError("INTERNAL", `layer ${i + 1} was merged as layer ${merged + 1}`);
    return "merged";
  }
  const entries: LayerEntry[] = [];
  const tar = await files.tar(i, "headers", report.onBytes);
  for await (const e of readTar(tar, { label: layerLabel(image, i) })) {
    entries.push({ header: e.header, offset: e.offset, stored: e.stored, sparse: e.sparse });
  }
  return entries;
}

/** Pass 2's source of file bytes: the layers read once more, in order. */
function layerContent(
  files: LayerFiles,
  image: ImageRecord,
  report: Reporter,
  reportLayers = true,
): ContentSource {
  return new LayerContent(async (i, transient) => {
    if (reportLayers) report.layer(i, image.layers.length);
    return files.tar(i, "content", report.onBytes, transient);
  });
}

export interface ExportResult {
  /** The store's copy; none when the result was written to an `output` the store could not clone. */
  artifact: ArtifactRecord | undefined;
  /** Absolute path of the result: the store's copy, else the output. */
  file: string;
  /** True when it came from the cache. */
  cached: boolean;
  /** Bytes written to `output`, when one was given. */
  bytes?: number | undefined;
  /**
   * The store's clone of a fresh `output` (which is durable), not yet fsynced itself: recorded
   * under its pending path, trusted by later exports of this boot only, which fsync and rename it.
   */
  pending?: boolean | undefined;
  /**
   * What the user should know about a fresh build, one line each (e.g. the xattrs a cpio archive
   * dropped). None for a result from the cache.
   */
  warnings: string[];
}

export interface ExportExtras {
  progress?: ExportProgress | undefined;
  /** Pass 1 already run during the pull, for the layers it fetched (flattened formats). */
  prefetch?: ExportPrefetch | undefined;
  /**
   * Write the result here (replaced atomically and fsynced): a cached artifact is copied (cloned
   * where the filesystem can); a new one is written here directly, and kept in the store only as a
   * clone (see keepClone).
   */
  output?: string | undefined;
}

/** Builds (or finds in the cache) the artifact for an image in the store. */
export async function exportArtifact(
  store: Store,
  image: ImageRecord,
  opts: ExportOptions,
  extras: ExportExtras = {},
): Promise<ExportResult> {
  if (!EXPORT_FORMATS.includes(opts.format)) {
    throw new KilnError(
      "INVALID_ARGUMENT",
      `unknown format "${opts.format}"; expected ${EXPORT_FORMATS.join(", ")}`,
    );
  }
  const report = new Reporter(extras.progress);
  const plan = (cached: boolean) =>
    extras.progress?.start?.({
      format: opts.format,
      layers: image.layers.map((l) => ({ digest: l.digest, size: l.size })),
      cached,
    });
  const copyOut = async (file: string, size: number) => {
    if (extras.output === undefined) return undefined;
    report.phase("copying", size);
    const bytes = await copyArtifact(file, extras.output, report.onBytes);
    report.end();
    return bytes;
  };

  const { key, options } = artifactKey(image, opts);
  const final = join(store.artifactsDir, `${key}.${opts.format}`);
  const record = (path: string, size: number): ArtifactRecord =>
    store.catalog.putArtifact({
      key,
      manifestDigest: image.manifestDigest,
      format: opts.format,
      options,
      path: relative(store.root, path),
      size,
    });
  const fromCache = async (artifact: ArtifactRecord, file: string): Promise<ExportResult> => {
    plan(true);
    const bytes = await copyOut(file, artifact.size);
    return { artifact, file, cached: true, bytes, warnings: [] };
  };

  const boot = await bootId();
  const existing = store.catalog.getArtifact(key);
  if (existing) {
    const file = join(store.root, existing.path);
    const size = await pathSize(file).catch(() => undefined);
    const pendingBoot = pendingBootOf(existing.path);
    if (size === existing.size && pendingBoot === undefined) return fromCache(existing, file);
    if (size === existing.size && pendingBoot === boot) {
      // Left by an earlier export of this boot, written but not fsynced: now it is.
      try {
        await fsyncTree(file);
        await rename(file, final);
        await fsyncPath(store.artifactsDir);
        return fromCache(record(final, size), final);
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== "ENOENT") throw err;
        // Another process took it first.
        const now = store.catalog.getArtifact(key);
        if (now && pendingBootOf(now.path) === undefined) return fromCache(now, join(store.root, now.path));
      }
    }
    // The record outlived its file (removed by hand), or a pending artifact outlived its boot (maybe
    // a crash: its blocks may never have reached the disk): build it again.
    store.catalog.removeArtifact(key);
    if (pendingBoot !== undefined) await rm(file, { recursive: true, force: true });
  }

  plan(false);
  const compressed = image.layers.reduce((n, l) => n + l.size, 0);
  const staging = await stagingFor(store, opts, extras);
  const warnings: string[] = [];
  const build = async (dest: string, tmpPrefix: string) => {
    const files = new LayerFiles(store.blobs, image.layers, (i) => layerLabel(image, i), {
      spoolPrefix: `${tmpPrefix}.spool`,
      spoolBudget: extras.prefetch?.budget ?? spoolBudget(),
    });
    try {
      if (opts.format === "erofs-layers") {
        report.phase("writing", 2 * compressed);
        await writeLayerImages(files, image, dest, report);
      } else {
        report.phase("reading", compressed);
        const root = await mergedTree(files, image, report, extras.prefetch);
        report.phase("writing", compressed);
        warnings.push(
          ...(await writeFormat(root, layerContent(files, image, report), dest, image, opts, staging)),
        );
      }
      report.end();
    } finally {
      await files.close();
    }
  };

  if (extras.output !== undefined) {
    // Written once, at the output: a second copy in the store would double what reaches the disk
    // (an image is often gigabytes). The store keeps one only where the filesystem can share the
    // blocks (a clone: nothing is written).
    let kept: ExportResult | undefined;
    const bytes = await replaceAtomically(
      extras.output,
      async (tmp) => {
        await build(tmp, tempIn(store, `export-${key}`));
        await fsyncTree(tmp);
        const size = await pathSize(tmp);
        if (boot !== undefined) {
          const pending = pendingPath(final, boot);
          if (await keepClone(tmp, pending, tempIn(store, `clone-${key}`))) {
            kept = { artifact: record(pending, size), file: pending, cached: false, pending: true, warnings };
          }
        }
        return size;
      },
      staging?.path,
    );
    return kept
      ? { ...kept, bytes }
      : { artifact: undefined, file: extras.output, cached: false, bytes, warnings };
  }

  const tmp = staging?.path ?? tempIn(store, `export-${key}`);
  try {
    await build(tmp, tmp);
    // Durable before it is renamed into place and recorded: a crash must never leave a record
    // pointing at a file whose blocks never reached the disk.
    await fsyncTree(tmp);
    await mkdir(store.artifactsDir, { recursive: true });
    await rename(tmp, final);
    await fsyncPath(store.artifactsDir);
    return { artifact: record(final, await pathSize(final)), file: final, cached: false, warnings };
  } catch (err) {
    await rm(tmp, { force: true, recursive: true });
    throw err;
  }
}

/**
 * Clones a fresh export (at `src`, fsynced) to `dest` in the store (through `tmp`), where the store's
 * filesystem can (btrfs, XFS); false elsewhere, with nothing left behind. The clone's own metadata
 * is not fsynced: the caller records it under its pending path (trusted by later exports of this
 * boot, which fsync and publish it).
 */
async function keepClone(src: string, dest: string, tmp: string): Promise<boolean> {
  try {
    if ((await stat(src)).isDirectory()) {
      await mkdir(tmp);
      for (const name of await readdir(src)) await cloneFile(join(src, name), join(tmp, name));
    } else {
      await cloneFile(src, tmp);
    }
    await mkdir(dirname(dest), { recursive: true });
    await rename(tmp, dest);
    return true;
  } catch {
    // No clones here (ext4, another filesystem, no support), or no room: nothing is kept.
    await rm(tmp, { recursive: true, force: true });
    return false;
  }
}

async function cloneFile(src: string, dest: string): Promise<void> {
  await copyFile(src, dest, constants.COPYFILE_EXCL | constants.COPYFILE_FICLONE_FORCE);
}

/**
 * This boot's id (Linux). An artifact written but not fsynced is whole in the page cache until the
 * machine stops, so within one boot it can be trusted and fsynced later; after a reboot (perhaps a
 * crash) it cannot, and is built again. Elsewhere: undefined, and every artifact is fsynced at once.
 */
let bootIdRead: Promise<string | undefined> | undefined;
function bootId(): Promise<string | undefined> {
  bootIdRead ??= readFile("/proc/sys/kernel/random/boot_id", "utf8").then(
    (s) => (/^[0-9a-f-]{32,36}$/.test(s.trim()) ? s.trim() : undefined),
    () => undefined,
  );
  return bootIdRead;
}

/** Where an artifact waits, not yet fsynced, for a later export of the same boot. */
function pendingPath(final: string, boot: string): string {
  return `${final}${PENDING}${boot}`;
}

const PENDING = ".pending-";

/** The boot a pending artifact's path names; undefined for a published one. */
function pendingBootOf(path: string): string | undefined {
  const at = path.lastIndexOf(PENDING);
  return at < 0 ? undefined : path.slice(at + PENDING.length);
}

async function writeFormat(
  root: Inode,
  content: ContentSource,
  out: string,
  image: ImageRecord,
  opts: ExportOptions,
  staging: Staging | undefined,
): Promise<string[]> {
  switch (opts.format) {
    case "cpio": {
      const { droppedXattrs } = await writeCpio(root, content, out, { compress: opts.compress ?? "none" });
      return droppedXattrs.count > 0 ? [droppedXattrsWarning(droppedXattrs)] : [];
    }
    case "erofs":
      await writeErofs(root, content, out, { uuid: derivedId(image.manifestDigest, "erofs-uuid") });
      return [];
    case "erofs-layers":
      throw new KilnError("INTERNAL", "erofs-layers is written by writeLayerImages");
    case "ext4":
      await writeExt4(root, content, out, {
        uuid: derivedId(image.manifestDigest, "ext4-uuid"),
        hashSeed: derivedId(image.manifestDigest, "ext4-hash-seed"),
        size: opts.size,
        free: opts.free,
        journal: opts.journal,
        staging,
      });
      return [];
  }
}

/** One line naming what a cpio archive lost: capabilities and SELinux labels matter at boot. */
function droppedXattrsWarning(d: DroppedXattrs): string {
  const more = d.count > d.first.length ? `, and ${d.count - d.first.length} more` : "";
  const names = d.names.length > 3 ? `${d.names.slice(0, 3).join(", ")}, …` : d.names.join(", ");
  return (
    `cpio cannot store extended attributes: dropped those of ${d.count} ${d.count === 1 ? "file" : "files"} ` +
    `(${d.first.join(", ")}${more}; ${names}); use ext4 or erofs to keep them`
  );
}

/** The manifest of an erofs-layers export: the images in overlay order, bottom first. */
export interface LayerImagesList {
  manifestDigest: string;
  layers: { file: string; digest: string; diffId: string | null }[];
}

/**
 * erofs-layers: one EROFS image per layer (whiteouts as overlayfs char 0:0 devices, opaque
 * directories with trusted.overlay.opaque=y) and `layers.json` listing them bottom first, so a guest
 * stacks them with `lowerdir=top:…:bottom`.
 */
async function writeLayerImages(
  files: LayerFiles,
  image: ImageRecord,
  dir: string,
  report: Reporter,
): Promise<void> {
  await mkdir(dir);
  const list: LayerImagesList = { manifestDigest: image.manifestDigest, layers: [] };
  // The flattened tree of the layers below, built alongside: parents a layer leaves out take their
  // metadata from it (see LayerTreeOptions.parentsFrom).
  const merged = new TreeBuilder({ fixedTime: IMPLICIT_DIR_TIME });
  // Layer by layer: the layer was reported when its headers were read.
  const content = layerContent(files, image, report, false);
  for (let i = 0; i < image.layers.length; i++) {
    const layer = image.layers[i]!;
    report.layer(i, image.layers.length);
    const below = merged.openLayer(i);
    const own = openLayerTree(i, { fixedTime: IMPLICIT_DIR_TIME, parentsFrom: merged.current });
    const tar = await files.tar(i, "headers", report.onBytes);
    for await (const entry of readTar(tar, { label: layerLabel(image, i) })) {
      own.add(entry);
      below.add(entry);
    }
    // The layer's own tree is finished against the lower layers before they take this one in.
    const root = own.close();
    below.close();
    const file = `layer-${String(i).padStart(3, "0")}.erofs`;
    await writeErofs(root, content, join(dir, file), {
      uuid: derivedId(`${image.manifestDigest}/${layer.digest}`, "erofs-layer-uuid"),
    });
    list.layers.push({ file, digest: layer.digest, diffId: layer.diffId });
  }
  const fh = await open(join(dir, "layers.json"), "wx");
  try {
    await fh.writeFile(`${JSON.stringify(list, null, 2)}\n`);
  } finally {
    await fh.close();
  }
}

async function dirSize(dir: string): Promise<number> {
  let total = 0;
  for (const name of await readdir(dir)) total += (await stat(join(dir, name))).size;
  return total;
}

/** A file's size, or the sum of the files of a directory (erofs-layers). */
async function pathSize(path: string): Promise<number> {
  const st = await stat(path);
  return st.isDirectory() ? dirSize(path) : st.size;
}

/** fsyncs a file, or the files of a directory and the directory. */
async function fsyncTree(path: string): Promise<void> {
  if ((await stat(path)).isDirectory()) {
    await Promise.all((await readdir(path)).map((name) => fsyncPath(join(path, name))));
  }
  await fsyncPath(path);
}

const CHUNK = 1 << 20;

/**
 * Copies an artifact (a file, or the directory of an erofs-layers export) to `out`, replaced
 * atomically. Where the filesystem can share blocks (btrfs, XFS, bcachefs: FICLONE) the copy is a
 * clone: no data is written, and the two files still change apart. Elsewhere (ext4) the bytes are
 * copied, all-zero blocks left as holes. Never a hardlink: the user may change `out` (boot a
 * writable disk from it), and the cached artifact must stay as it was built.
 */
export async function copyArtifact(
  src: string,
  out: string,
  onBytes?: ((n: number) => void) | undefined,
): Promise<number> {
  if (!(await stat(src)).isDirectory())
    return replaceAtomically(out, (tmp) => cloneOrCopy(src, tmp, onBytes));
  return replaceAtomically(out, async (tmp) => {
    await mkdir(tmp);
    let total = 0;
    for (const name of (await readdir(src)).sort())
      total += await cloneOrCopy(join(src, name), join(tmp, name), onBytes);
    await fsyncPath(tmp);
    return total;
  });
}

/** `dest` (new) with `src`'s bytes, fsynced: a clone where the filesystem can, else a sparse copy. */
async function cloneOrCopy(
  src: string,
  dest: string,
  onBytes: ((n: number) => void) | undefined,
): Promise<number> {
  try {
    await cloneFile(src, dest);
  } catch {
    // No clone here (ext4, another filesystem, no support): copy the bytes.
    await rm(dest, { force: true });
    return writeSparseCopy(src, dest, onBytes);
  }
  await fsyncPath(dest);
  const size = (await stat(dest)).size;
  onBytes?.(size);
  return size;
}

/**
 * Writes a new file `dest` with `src`'s bytes, zero blocks as holes, fsynced. The next chunk is
 * read while the current one is written; both buffers are page-aligned, so reads copy fast and
 * writes can go straight to the disk (O_DIRECT, as the writers' data streams do).
 */
async function writeSparseCopy(
  src: string,
  dest: string,
  onBytes: ((n: number) => void) | undefined,
): Promise<number> {
  const input = await open(src, "r");
  try {
    const output = await open(dest, "wx");
    const direct = await openDirect(dest);
    const sink: Sink = { fh: output, direct, buffered: 0 };
    try {
      const size = (await input.stat()).size;
      const memory = pageAligned(2 * CHUNK);
      const readAt = async (pos: number, buf: Buffer) => {
        const { bytesRead } = await input.read(buf, 0, Math.min(CHUNK, size - pos), pos);
        return bytesRead;
      };
      let [buf, spare] = [memory.subarray(0, CHUNK), memory.subarray(CHUNK)];
      let pos = 0;
      let next = size > 0 ? readAt(0, buf) : undefined;
      while (next) {
        const n = await next;
        if (n === 0) break;
        next = pos + n < size ? readAt(pos + n, spare) : undefined;
        // A read into the spare buffer is under way: it must not fail unobserved if a write fails.
        next?.catch(() => {});
        await writeSparse(sink, buf, n, pos);
        onBytes?.(n);
        pos += n;
        [buf, spare] = [spare, buf];
      }
      await output.truncate(size);
      await output.sync();
      return size;
    } finally {
      await direct?.close();
      await output.close();
    }
  } finally {
    await input.close();
  }
}
