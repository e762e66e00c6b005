/**
 * Image → filesystem. Pass 1 decompresses each layer (checking its diff ID), reads its tar headers
 * and merges them into one tree (or one tree per layer); pass 2 streams file bytes from the layers
 * again, in layer order, into the writer. The result is published into the store's artifact cache
 * (temp file, fsync, rename, then recorded), keyed by (manifest digest, format, options), so the
 * same export again is a copy.
 */
import { createHash, randomBytes } from "node:crypto";
import { createReadStream, openSync } from "node:fs";
import { mkdir, open, readdir, rename, rm, stat } from "node:fs/promises";
import { join, relative } from "node:path";
import type { Readable } from "node:stream";
import { KilnError } from "../errors.js";
import { writeCpio } from "../fs/cpio/writer.js";
import { writeErofs } from "../fs/erofs/writer.js";
import { writeExt4 } from "../fs/ext4/writer.js";
import type { ContentSource, Inode } from "../fs/tree.js";
import { LayerContent } from "../layers/content.js";
import { openLayerStream } from "../layers/decompress.js";
import { type LayerEntry, openLayerTree, TreeBuilder } from "../layers/merge.js";
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

/**
 * Reads of 1 MiB: at the stream default of 64 KiB, the per-chunk cost (a thread-pool round trip, the
 * async iterators above it) made reading a layer several times slower than the disk.
 */
const READ_CHUNK = 1 << 20;

/** A layer blob as a stream of large chunks. Opened now, so a later delete cannot break the read. */
function openBlob(store: Store, digest: string): Readable {
  const file = store.blobs.path(digest);
  let fd: number;
  try {
    fd = openSync(file, "r");
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") {
      throw new KilnError("NOT_FOUND", `blob ${digest} is not in the store`, {
        cause: err,
        details: { digest },
      });
    }
    throw err;
  }
  return createReadStream(file, { fd, highWaterMark: READ_CHUNK });
}

/** The uncompressed, diff-ID-checked stream of layer i of an image in the store. */
function openLayer(store: Store, image: ImageRecord, i: number): AsyncIterable<Buffer> {
  const layer = image.layers[i]!;
  return openLayerStream(openBlob(store, layer.digest), {
    diffId: layer.diffId ?? undefined,
    label: layerLabel(image, i),
  });
}

/** Pass 1: every layer's tar headers merged into one tree (whiteouts applied). */
export async function mergedTree(store: Store, image: ImageRecord): Promise<Inode> {
  const builder = new TreeBuilder({ fixedTime: IMPLICIT_DIR_TIME });
  // The next layer is decompressed and read while this one merges: zlib and zstd run on the thread
  // pool, so two layers use both cores. Only headers are kept, one layer ahead at most.
  const read = (i: number) => {
    const p = layerHeaders(store, image, i);
    // Awaited later; until then a failure must not count as unhandled.
    p.catch(() => {});
    return p;
  };
  let next = read(0);
  for (let i = 0; i < image.layers.length; i++) {
    const entries = await next;
    if (i + 1 < image.layers.length) next = read(i + 1);
    await builder.addLayer(i, entries);
  }
  return builder.finish();
}

/** One layer's entries without their data (read and verified to the end, diff ID included). */
async function layerHeaders(store: Store, image: ImageRecord, i: number): Promise<LayerEntry[]> {
  const entries: LayerEntry[] = [];
  for await (const e of readTar(openLayer(store, image, i), { label: layerLabel(image, i) })) {
    entries.push({ header: e.header, offset: e.offset, stored: e.stored, sparse: e.sparse });
  }
  return entries;
}

/** Pass 2's source of file bytes: each layer read once more, in order. */
export function layerContent(store: Store, image: ImageRecord): ContentSource {
  return new LayerContent(async (i) => openLayer(store, image, i));
}

export interface ExportResult {
  artifact: ArtifactRecord;
  /** Absolute path of the artifact in the store. */
  file: string;
  /** True when it came from the cache. */
  cached: boolean;
}

/** Builds (or finds in the cache) the artifact for an image in the store. */
export async function exportArtifact(
  store: Store,
  image: ImageRecord,
  opts: ExportOptions,
): Promise<ExportResult> {
  if (!EXPORT_FORMATS.includes(opts.format)) {
    throw new KilnError(
      "INVALID_ARGUMENT",
      `unknown format "${opts.format}"; expected ${EXPORT_FORMATS.join(", ")}`,
    );
  }
  const { key, options } = artifactKey(image, opts);
  const existing = store.catalog.getArtifact(key);
  if (existing) {
    const file = join(store.root, existing.path);
    const st = await stat(file).catch(() => undefined);
    const size = st?.isDirectory() ? await dirSize(file) : st?.size;
    if (size === existing.size) return { artifact: existing, file, cached: true };
    // The record outlived its file (removed by hand): build it again.
    store.catalog.removeArtifact(key);
  }

  const final = join(store.artifactsDir, `${key}.${opts.format}`);
  const tmp = join(store.tmpDir, `export-${key}-${process.pid}-${randomBytes(4).toString("hex")}`);
  try {
    if (opts.format === "erofs-layers") await writeLayerImages(store, image, tmp);
    else await writeFormat(await mergedTree(store, image), layerContent(store, image), tmp, image, opts);
    await mkdir(store.artifactsDir, { recursive: true });
    await rename(tmp, final);
    await fsyncPath(store.artifactsDir);
  } catch (err) {
    await rm(tmp, { force: true, recursive: true });
    throw err;
  }
  const size = opts.format === "erofs-layers" ? await dirSize(final) : (await stat(final)).size;
  const artifact = store.catalog.putArtifact({
    key,
    manifestDigest: image.manifestDigest,
    format: opts.format,
    options,
    path: relative(store.root, final),
    size,
  });
  return { artifact, file: final, cached: false };
}

async function writeFormat(
  root: Inode,
  content: ContentSource,
  out: string,
  image: ImageRecord,
  opts: ExportOptions,
): Promise<void> {
  switch (opts.format) {
    case "cpio":
      await writeCpio(root, content, out, { compress: opts.compress ?? "none" });
      return;
    case "erofs":
      await writeErofs(root, content, out, { uuid: derivedId(image.manifestDigest, "erofs-uuid") });
      return;
    case "erofs-layers":
      throw new KilnError("INTERNAL", "erofs-layers is written by writeLayerImages");
    case "ext4":
      await writeExt4(root, content, out, {
        uuid: derivedId(image.manifestDigest, "ext4-uuid"),
        hashSeed: derivedId(image.manifestDigest, "ext4-hash-seed"),
        size: opts.size,
        free: opts.free,
        journal: opts.journal,
      });
      return;
  }
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
async function writeLayerImages(store: Store, image: ImageRecord, dir: string): Promise<void> {
  await mkdir(dir);
  const list: LayerImagesList = { manifestDigest: image.manifestDigest, layers: [] };
  // The flattened tree of the layers below, built alongside: parents a layer leaves out take their
  // metadata from it (see LayerTreeOptions.parentsFrom).
  const merged = new TreeBuilder({ fixedTime: IMPLICIT_DIR_TIME });
  for (let i = 0; i < image.layers.length; i++) {
    const layer = image.layers[i]!;
    const below = merged.openLayer(i);
    const own = openLayerTree(i, { fixedTime: IMPLICIT_DIR_TIME, parentsFrom: merged.current });
    for await (const entry of readTar(openLayer(store, image, i), { label: layerLabel(image, i) })) {
      own.add(entry);
      below.add(entry);
    }
    // The layer's own tree is finished against the lower layers before they take this one in.
    const root = own.close();
    below.close();
    const file = `layer-${String(i).padStart(3, "0")}.erofs`;
    await writeErofs(root, layerContent(store, image), join(dir, file), {
      uuid: derivedId(`${image.manifestDigest}/${layer.digest}`, "erofs-layer-uuid"),
    });
    list.layers.push({ file, digest: layer.digest, diffId: layer.diffId });
  }
  const fh = await open(join(dir, "layers.json"), "wx");
  try {
    await fh.writeFile(`${JSON.stringify(list, null, 2)}\n`);
    await fh.sync();
  } finally {
    await fh.close();
  }
  await fsyncPath(dir);
}

async function dirSize(dir: string): Promise<number> {
  let total = 0;
  for (const name of await readdir(dir)) total += (await stat(join(dir, name))).size;
  return total;
}

const BLOCK = 4096;
const CHUNK = 1 << 20;

/**
 * Copies an artifact to `out` through a temp file beside it, leaving holes where the source has
 * all-zero blocks (disk images are mostly empty), then renames it into place.
 */
/** Copies an artifact (a file, or the directory of an erofs-layers export) to `out`, replacing it. */
export async function copyArtifact(src: string, out: string): Promise<number> {
  if (!(await stat(src)).isDirectory()) return copySparse(src, out);
  return replaceAtomically(out, async (tmp) => {
    await mkdir(tmp);
    let total = 0;
    for (const name of (await readdir(src)).sort())
      total += await writeSparseCopy(join(src, name), join(tmp, name));
    await fsyncPath(tmp);
    return total;
  });
}

/**
 * Copies a file to `out` (replaced atomically), leaving holes where the source has all-zero blocks
 * (disk images are mostly empty).
 */
export function copySparse(src: string, out: string): Promise<number> {
  return replaceAtomically(out, (tmp) => writeSparseCopy(src, tmp));
}

/** Writes a new file `dest` with `src`'s bytes, zero blocks as holes, fsynced. */
async function writeSparseCopy(src: string, dest: string): Promise<number> {
  const input = await open(src, "r");
  try {
    const output = await open(dest, "wx");
    try {
      const size = (await input.stat()).size;
      const buf = Buffer.alloc(CHUNK);
      for (let pos = 0; pos < size; ) {
        const { bytesRead } = await input.read(buf, 0, Math.min(CHUNK, size - pos), pos);
        if (bytesRead === 0) break;
        // Write each run of non-zero blocks with one call; zero blocks stay holes.
        let run = -1;
        for (let off = 0; off < bytesRead; off += BLOCK) {
          const zero = isZero(buf, off, Math.min(off + BLOCK, bytesRead));
          if (!zero && run < 0) run = off;
          if (zero && run >= 0) {
            await output.write(buf, run, off - run, pos + run);
            run = -1;
          }
        }
        if (run >= 0) await output.write(buf, run, bytesRead - run, pos + run);
        pos += bytesRead;
      }
      await output.truncate(size);
      await output.sync();
      return size;
    } finally {
      await output.close();
    }
  } finally {
    await input.close();
  }
}

const ZERO_BLOCK = Buffer.alloc(BLOCK);

function isZero(buf: Buffer, start: number, end: number): boolean {
  return ZERO_BLOCK.compare(buf, start, end, 0, end - start) === 0;
}
