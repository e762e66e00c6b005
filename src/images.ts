/**
 * The library's image operations: pull, import, list, inspect, remove. The CLI and (later) the HTTP
 * service are thin layers over these. The registry client and the archive readers are loaded only by
 * the operations that use them: a CLI process pays for what its command needs (start-up time is most
 * of a warm pull).
 */

import { randomBytes } from "node:crypto";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import type { RuntimeConfig } from "./boot/runtime.js";
import type { ExportPrefetch, ExportProgress, LayerImagesList } from "./build/export.js";
import type { ExportFormat } from "./build/formats.js";
import { checkOutput, type OutputShape, type OutputTarget } from "./build/output-path.js";
import { replaceAtomically } from "./build/publish.js";
import { KilnError } from "./errors.js";
import { parseReference } from "./reference/reference.js";
import { parseConfig } from "./registry/manifest.js";
import { formatPlatform, hostPlatform, type Platform } from "./registry/platform.js";
import { type IngestProgress, type IngestResult, ingestImage } from "./source/ingest.js";
import type { RegistryPullOptions } from "./source/pull.js";
import type { BuildRow } from "./store/builds.js";
import type { ImageRecord } from "./store/catalog.js";
import type { GcReport } from "./store/gc.js";
import { openStore, removeImages as removeFromStore, type Store } from "./store/store.js";

export interface StoreOptions {
  /** The store directory (default: KILN_ROOT, else $XDG_DATA_HOME/kiln, else ~/.local/share/kiln). */
  root?: string | undefined;
}

export interface PullOptions extends StoreOptions, RegistryPullOptions {
  platform?: Platform | undefined;
  progress?: IngestProgress | undefined;
  signal?: AbortSignal | undefined;
}

async function withStore<T>(opts: StoreOptions, fn: (store: Store) => Promise<T>): Promise<T> {
  const store = await openStore(opts.root);
  try {
    return await fn(store);
  } finally {
    store.close();
  }
}

/** Pulls an image from its registry into the store, verified; blobs already present are not fetched. */
export async function pull(reference: string, opts: PullOptions = {}): Promise<IngestResult> {
  const ref = parseReference(reference);
  const { pullInto } = await import("./source/pull.js");
  return withStore(opts, (store) => pullInto(store, ref, opts));
}

export interface ImportOptions extends StoreOptions {
  /** Names the imported image (the archive may carry none). */
  tag?: string | undefined;
  platform?: Platform | undefined;
  progress?: IngestProgress | undefined;
  signal?: AbortSignal | undefined;
}

/**
 * Imports a docker-archive tar, an OCI layout directory or an OCI archive tar. Every image in it is
 * checked before any is recorded, so a broken archive imports nothing.
 */
export async function importArchive(file: string, opts: ImportOptions = {}): Promise<IngestResult[]> {
  const { openArchive } = await import("./source/archive.js");
  return withStore(opts, async (store) => {
    const sources = await openArchive(file, { tag: opts.tag, tmpDir: store.tmpDir });
    try {
      const results: IngestResult[] = [];
      for (const source of sources) {
        results.push(
          await ingestImage(store, source, {
            platform: opts.platform,
            progress: opts.progress,
            signal: opts.signal,
          }),
        );
      }
      return results;
    } finally {
      for (const s of sources) await s.close();
    }
  });
}

export async function listImages(opts: StoreOptions = {}): Promise<ImageRecord[]> {
  return withStore(opts, async (store) => store.catalog.list());
}

/** The images of the store and the builds `kiln serve` was asked for (one read of the catalog). */
export async function listImagesAndBuilds(
  opts: StoreOptions = {},
): Promise<{ images: ImageRecord[]; builds: BuildRow[] }> {
  const { Builds } = await import("./store/builds.js");
  return withStore(opts, async (store) => ({
    images: store.catalog.list(),
    builds: new Builds(store.catalog).list(),
  }));
}

export interface LookupOptions extends StoreOptions {
  platform?: Platform | undefined;
}

/** Finds one image by ref, normalized ref or unique manifest digest prefix. */
export async function findImage(arg: string, opts: LookupOptions = {}): Promise<ImageRecord> {
  return withStore(opts, async (store) => lookup(store, arg, opts.platform));
}

function lookup(store: Store, arg: string, platform: Platform | undefined): ImageRecord {
  return store.catalog.resolve(arg, {
    platform: platform ? formatPlatform(platform) : undefined,
    hostPlatform: formatPlatform(hostPlatform()),
  });
}

/** What `kiln inspect` prints: the image's identity, layers and runtime config. */
export interface ImageInspect {
  ref: string | null;
  digest: string;
  indexDigest: string | null;
  mediaType: string;
  configDigest: string;
  platform: string;
  size: number;
  created: string | null;
  layers: { digest: string; diffId: string | null; mediaType: string; size: number }[];
  config: {
    entrypoint: string[] | null;
    cmd: string[] | null;
    env: string[];
    workingDir: string;
    user: string;
    labels: Record<string, string>;
    stopSignal: string | null;
    exposedPorts: string[];
    volumes: string[];
  };
}

export function describeImage(image: ImageRecord): ImageInspect {
  const c = parseConfig(Buffer.from(image.config, "utf8")).config ?? {};
  return {
    ref: image.ref,
    digest: image.manifestDigest,
    indexDigest: image.indexDigest,
    mediaType: image.manifestMediaType,
    configDigest: image.configDigest,
    platform: image.platform,
    size: image.size,
    created: image.created,
    layers: image.layers.map((l) => ({
      digest: l.digest,
      diffId: l.diffId,
      mediaType: l.mediaType,
      size: l.size,
    })),
    config: {
      entrypoint: c.Entrypoint ?? null,
      cmd: c.Cmd ?? null,
      env: c.Env ?? [],
      workingDir: c.WorkingDir ?? "",
      user: c.User ?? "",
      labels: c.Labels ?? {},
      stopSignal: c.StopSignal || null,
      exposedPorts: Object.keys(c.ExposedPorts ?? {}).sort(),
      volumes: Object.keys(c.Volumes ?? {}).sort(),
    },
  };
}

export async function inspectImage(arg: string, opts: LookupOptions = {}): Promise<ImageInspect> {
  return describeImage(await findImage(arg, opts));
}

export interface RemoveResult {
  removed: ImageRecord[];
  /** Arguments that matched nothing (or were ambiguous), with the error for each. */
  failed: { arg: string; error: KilnError }[];
}

/** Removes images (as `docker rmi`): each argument on its own; blobs no other image uses are deleted. */
export async function removeImages(args: string[], opts: LookupOptions = {}): Promise<RemoveResult> {
  return withStore(opts, async (store) => {
    const removed: ImageRecord[] = [];
    const failed: { arg: string; error: KilnError }[] = [];
    for (const arg of args) {
      try {
        const image = lookup(store, arg, opts.platform);
        if (!removed.some((r) => r.id === image.id)) removed.push(image);
      } catch (err) {
        if (!(err instanceof KilnError)) throw err;
        failed.push({ arg, error: err });
      }
    }
    await removeFromStore(store, removed);
    return { removed, failed };
  });
}

export type { ImageRecord, IngestProgress, IngestResult };

export interface ExportImageOptions extends LookupOptions {
  format: ExportFormat;
  /** cpio: compress the archive. */
  compress?: "gzip" | "none" | undefined;
  /** ext4: exact size in bytes. */
  size?: number | undefined;
  /** ext4: extra free space in bytes, for writable disks. */
  free?: number | undefined;
  /** ext4: add a jbd2 journal, for disks mounted read-write. */
  journal?: boolean | undefined;
  /** Phases, layers and bytes of the conversion and of the copy to `out`. */
  progress?: ExportProgress | undefined;
  /**
   * Replace what `out` holds where it is refused otherwise: a directory (single-file formats), a
   * non-empty directory or a file (erofs-layers).
   */
  force?: boolean | undefined;
}

export interface ExportImageResult {
  image: ImageRecord;
  /** Where the output was written. */
  out: string;
  bytes: number;
  format: ExportFormat;
  /** The artifact came from the store's cache. */
  cached: boolean;
  /** What the user should know about the output, one line each (e.g. xattrs cpio dropped). */
  warnings: string[];
}

/**
 * Writes an image of the store as a filesystem to `out` (replaced atomically), or, without `out`,
 * into the store's artifact cache (the result's `out` is then the cached file). A cached artifact is
 * copied (cloned where the filesystem can); a new one is written to `out` directly. A symlink at
 * `out` is followed (its target is written); a block device is written in place; a character
 * device, a FIFO, and what would lose data without `force`, are refused before any work.
 */
export async function exportImage(
  arg: string,
  out: string | undefined,
  opts: ExportImageOptions,
): Promise<ExportImageResult> {
  const target = await exportTarget(out, opts);
  return withStore(opts, async (store) =>
    exportInStore(store, lookup(store, arg, opts.platform), out, target, opts),
  );
}

function shapeOf(format: ExportFormat): OutputShape {
  return format === "erofs-layers" ? "directory" : "file";
}

/** `out` checked against the output rules (src/build/output-path.ts): before the work, not after it. */
async function exportTarget(
  out: string | undefined,
  opts: Pick<ExportImageOptions, "format" | "force" | "size">,
): Promise<OutputTarget | undefined> {
  if (out === undefined) return undefined;
  const target = await checkOutput(out, { shape: shapeOf(opts.format), force: opts.force });
  if (target.device && opts.size !== undefined) {
    const { checkFitsDevice } = await import("./build/block-device.js");
    await checkFitsDevice(target.path, opts.size);
  }
  return target;
}

async function exportInStore(
  store: Store,
  image: ImageRecord,
  out: string | undefined,
  target: OutputTarget | undefined,
  opts: ExportImageOptions,
  prefetch?: ExportPrefetch,
): Promise<ExportImageResult> {
  const { exportArtifact } = await import("./build/export.js");
  const options = {
    format: opts.format,
    compress: opts.compress,
    size: opts.size,
    free: opts.free,
    journal: opts.journal,
  };
  const done = (bytes: number, cached: boolean, warnings: string[], file: string) =>
    ({ image, out: out ?? file, bytes, format: opts.format, cached, warnings }) satisfies ExportImageResult;
  if (target?.device) {
    // Built in the store (and cached there), then written onto the device from its first byte.
    const { writeToDevice } = await import("./build/block-device.js");
    const r = await exportArtifact(store, image, options, { progress: opts.progress, prefetch });
    return done(await writeToDevice(r.file, target.path), r.cached, r.warnings, r.file);
  }
  const output = target?.path;
  const r = await exportArtifact(store, image, options, { output, progress: opts.progress, prefetch });
  const bytes = output !== undefined ? (r.bytes ?? 0) : (r.artifact?.size ?? 0);
  return done(bytes, r.cached, r.warnings, r.file);
}

export interface PullExportOptions extends PullOptions {
  export: Omit<ExportImageOptions, keyof LookupOptions>;
  /** Called once the image is in the store, before the export's remaining work. */
  onPulled?: ((result: IngestResult) => void) | undefined;
}

/**
 * `pull` then `exportImage`, with the export's first pass (decompression, diff ID check, tar headers)
 * run on each layer as it downloads rather than after: so the two overlap.
 */
export async function pullAndExport(
  reference: string,
  out: string | undefined,
  opts: PullExportOptions,
): Promise<{ pulled: IngestResult; exported: ExportImageResult }> {
  const ref = parseReference(reference);
  const [{ pullInto }, { prefetchFor }] = await Promise.all([
    import("./source/pull.js"),
    import("./build/export.js"),
  ]);
  const target = await exportTarget(out, opts.export);
  return withStore(opts, async (store) => {
    const prefetch = prefetchFor(store, opts.export.format, target?.device ? undefined : target?.path);
    try {
      const pulled = await pullInto(store, ref, { ...opts, tap: prefetch?.tap });
      opts.onPulled?.(pulled);
      const exported = await exportInStore(store, pulled.image, out, target, opts.export, prefetch);
      return { pulled, exported };
    } finally {
      await prefetch?.close();
    }
  });
}

/**
 * Creates an empty, sparse ext4 filesystem of `size` bytes (volumes, overlay uppers). An existing
 * non-empty file or a directory at `out` is refused without `force` (it may be a disk with data); a
 * device is always refused (a disk is a file here). A symlink is followed.
 */
export async function createDisk(
  out: string,
  size: number,
  opts: { label?: string; force?: boolean } = {},
): Promise<{ out: string; bytes: number }> {
  const target = await checkOutput(out, {
    shape: "file",
    force: opts.force,
    keepFiles: true,
    devices: false,
  });
  const { createEmptyExt4 } = await import("./fs/ext4/writer.js");
  // A fresh UUID per disk: two volumes attached to one VM must not share one.
  const r = await replaceAtomically(target.path, (tmp) =>
    createEmptyExt4(tmp, size, { uuid: randomBytes(16), hashSeed: randomBytes(16), label: opts.label }),
  );
  return { out, bytes: r.bytes };
}

export interface GcOptions extends StoreOptions {
  /** Only garbage older than this goes (default 1 h): work in flight elsewhere is younger. */
  graceMs?: number | undefined;
  /** Report what would be freed; delete nothing. */
  dryRun?: boolean | undefined;
}

/**
 * Frees blobs no image needs, exports of images no longer in the store, and stale temp files;
 * safe while other kiln processes pull and build in the same store.
 */
export async function gc(opts: GcOptions = {}): Promise<GcReport> {
  const { collectGarbage } = await import("./store/gc.js");
  return withStore(opts, (store) => collectGarbage(store, { graceMs: opts.graceMs, dryRun: opts.dryRun }));
}

export type { GcReport };

export interface BootImageOptions extends LookupOptions {
  format: ExportFormat;
  /** Replaces the image's cmd (`docker run IMAGE CMD…`). */
  args?: string[] | undefined;
  /** Copy the exported root here (`rootfs.FORMAT`); else the store's cached export is used in place. */
  outDir?: string | undefined;
}

export interface BootImage {
  image: ImageRecord;
  format: ExportFormat;
  /** The root's files: one image, or (erofs-layers) one per layer, bottom first. */
  files: string[];
  runtime: RuntimeConfig;
  cached: boolean;
  /** What the user should know about the exported root (see ExportImageResult.warnings). */
  warnings: string[];
}

/** What `kiln boot` and `kiln vm-config` need of an image: its exported root and how to run it. */
export async function prepareBootImage(arg: string, opts: BootImageOptions): Promise<BootImage> {
  const { exportArtifact } = await import("./build/export.js");
  const { runtimeConfig } = await import("./boot/runtime.js");
  return withStore(opts, async (store) => {
    const image = lookup(store, arg, opts.platform);
    // Before the export: an unknown user or a missing command fails at once.
    const runtime = await runtimeConfig(store, image, { args: opts.args });
    const output = opts.outDir === undefined ? undefined : join(opts.outDir, `rootfs.${opts.format}`);
    // cpio uncompressed: the kernel unpacks it as fast as it reads it, and it is cached as `export` makes it.
    const r = await exportArtifact(store, image, { format: opts.format, compress: "none" }, { output });
    const path = output ?? r.file;
    let files = [path];
    if (opts.format === "erofs-layers") {
      const list = JSON.parse(await readFile(join(path, "layers.json"), "utf8")) as LayerImagesList;
      files = list.layers.map((l) => join(path, l.file));
    }
    return { image, format: opts.format, files, runtime, cached: r.cached, warnings: r.warnings };
  });
}

export type { RuntimeConfig };
