/**
 * An image in the store, read without extracting it: its merged tree (one pass over every layer's
 * tar headers) and the bytes of chosen files (a second pass over only the layers that hold them).
 * Paths are resolved inside the image root, as a container would see them: symlinks are followed
 * with the root as "/", and ".." never climbs above it.
 */
import { createReadStream, openSync } from "node:fs";
import { posix } from "node:path";
import type { Readable } from "node:stream";
import { KilnError } from "../errors.js";
import { logicalContent } from "../fs/sparse.js";
import type { ContentSource, Inode } from "../fs/tree.js";
import { fromText } from "../io/bytestring.js";
import { formatSize } from "../sizes.js";
import type { ImageRecord } from "../store/catalog.js";
import type { Store } from "../store/store.js";
import { readTar } from "../tar/reader.js";
import { LayerContent } from "./content.js";
import { openLayerStream } from "./decompress.js";
import { type LayerEntry, TreeBuilder } from "./merge.js";

/** Directories a tar does not list get this time (the epoch), so output never depends on the clock. */
export const IMPLICIT_DIR_TIME = 0;

/**
 * Reads of 1 MiB: at the stream default of 64 KiB, the per-chunk cost (a thread-pool round trip, the
 * async iterators above it) made reading a layer several times slower than the disk.
 */
const READ_CHUNK = 1 << 20;

/** Layers whose headers are read at once (two cores: one big layer and the small ones beside it). */
const HEADERS_AHEAD = 2;

/** Names layer i in errors: `layer 2/3 (sha256:…)`. */
export function layerLabel(image: ImageRecord, i: number): string {
  return `layer ${i + 1}/${image.layers.length} (${image.layers[i]!.digest})`;
}

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

/** The uncompressed, diff-ID-checked tar stream of layer i of an image in the store. */
export function openImageLayer(store: Store, image: ImageRecord, i: number): AsyncIterable<Buffer> {
  const layer = image.layers[i]!;
  return openLayerStream(openBlob(store, layer.digest), {
    diffId: layer.diffId ?? undefined,
    label: layerLabel(image, i),
  });
}

/** One layer's entries without their data (read and verified to the end, diff ID included). */
async function layerHeaders(store: Store, image: ImageRecord, i: number): Promise<LayerEntry[]> {
  const entries: LayerEntry[] = [];
  for await (const e of readTar(openImageLayer(store, image, i), { label: layerLabel(image, i) })) {
    entries.push({ header: e.header, offset: e.offset, stored: e.stored, sparse: e.sparse });
  }
  return entries;
}

/** Every layer's tar headers merged into one tree (whiteouts applied); file bytes stay in the layers. */
export async function openImageTree(store: Store, image: ImageRecord): Promise<Inode> {
  const builder = new TreeBuilder({ fixedTime: IMPLICIT_DIR_TIME });
  // Layers are read HEADERS_AHEAD at a time while the finished ones merge in order: gzip inflates on
  // the thread pool, so a small layer is read beside a big one instead of after it.
  const reads: Promise<LayerEntry[]>[] = [];
  const read = (i: number) => {
    if (i >= image.layers.length) return;
    const p = layerHeaders(store, image, i);
    // Awaited later; until then a failure must not count as unhandled.
    p.catch(() => {});
    reads[i] = p;
  };
  for (let i = 0; i < HEADERS_AHEAD; i++) read(i);
  for (let i = 0; i < image.layers.length; i++) {
    const entries = await reads[i]!;
    delete reads[i];
    read(i + HEADERS_AHEAD);
    await builder.addLayer(i, entries);
  }
  return builder.finish();
}

/** File bytes of the image's tree: each layer holding a requested file is read once more, in order. */
export function imageContent(store: Store, image: ImageRecord): ContentSource {
  return new LayerContent(async (i) => openImageLayer(store, image, i));
}

/** Symlinks followed while resolving one path before giving up (Linux's limit). */
export const MAX_SYMLINKS = 40;

export interface ResolvedPath {
  inode: Inode;
  /** Canonical absolute path inside the image: no symlink, "." or ".." left. */
  path: string;
  /**
   * Each absolute path the walk arrived at after expanding a symlink, in order (lexically
   * normalized). `/sbin/init` with `/sbin → usr/sbin` and `/usr/sbin/init → /lib/systemd/systemd`
   * gives `/usr/sbin/init`, `/lib/systemd/systemd`, … — the names the file is reached through.
   */
  via: string[];
}

/**
 * Resolves `path` (a byte string, as the tree's names: fromText for text) in the tree as the kernel
 * would inside a chroot at `root`: symlinks are followed
 * (absolute targets from the root, ".." stops at the root), the last component too unless
 * `followLast` is false. Missing entries, a non-directory in the middle or more than MAX_SYMLINKS
 * links → undefined.
 */
export function resolveInTree(
  root: Inode,
  path: string,
  opts: { followLast?: boolean } = {},
): ResolvedPath | undefined {
  const followLast = opts.followLast ?? true;
  const todo = splitPath(path);
  const names: string[] = [];
  const dirs: Inode[] = [root];
  const via: string[] = [];
  let links = 0;
  while (todo.length > 0) {
    const c = todo.shift()!;
    if (c === ".") continue;
    if (c === "..") {
      if (names.length > 0) {
        names.pop();
        dirs.pop();
      }
      continue;
    }
    const dir = dirs[dirs.length - 1]!;
    const child = dir.entries?.get(c);
    if (child === undefined || dir.type !== "directory") return undefined;
    if (child.type === "symlink" && (todo.length > 0 || followLast)) {
      if (++links > MAX_SYMLINKS) return undefined;
      if (child.target.startsWith("/")) {
        names.length = 0;
        dirs.length = 1;
      }
      todo.unshift(...splitPath(child.target));
      via.push(posix.normalize(`/${[...names, ...todo].join("/")}`));
      continue;
    }
    names.push(c);
    dirs.push(child);
  }
  return { inode: dirs[dirs.length - 1]!, path: `/${names.join("/")}`, via };
}

function splitPath(path: string): string[] {
  return path.split("/").filter((c) => c !== "");
}

/**
 * Streams the bytes of regular files of the image's tree to `each`, one file at a time: only the
 * layers holding them are read, each once (to its end, so its diff ID is checked). `each` must read
 * `data` to its end before returning. A file listed twice (or under two names) comes once.
 */
export async function readTreeFiles(
  store: Store,
  image: ImageRecord,
  files: readonly Inode[],
  each: (inode: Inode, data: AsyncIterable<Buffer>) => Promise<void>,
): Promise<void> {
  const unique = [...new Set(files)];
  for (const f of unique) {
    if (f.type !== "file") throw new KilnError("INTERNAL", `readTreeFiles: a ${f.type} has no file bytes`);
  }
  // LayerContent takes files in dataOrder: by layer, then by offset in the layer.
  const order = (f: Inode) => [f.data?.layer ?? -1, f.data?.offset ?? 0] as const;
  unique.sort((a, b) => order(a)[0] - order(b)[0] || order(a)[1] - order(b)[1]);
  for await (const { inode, data } of imageContent(store, image).contents(unique))
    await each(
      inode,
      logicalContent(inode, data, () => `layer ${inode.data?.layer} offset ${inode.data?.offset}`),
    );
}

/**
 * The bytes of the regular file at `path` in the image (symlinks followed inside the image root),
 * or undefined when there is none there. More than `maxBytes` → TOO_LARGE naming the file. Pass
 * `tree` (openImageTree) when reading several files, so the headers are read once.
 */
export async function readImageFile(
  store: Store,
  image: ImageRecord,
  path: string,
  maxBytes: number,
  tree?: Inode,
): Promise<Buffer | undefined> {
  const found = await readImageFiles(store, image, [path], maxBytes, tree);
  return found.get(path);
}

/** Several files at once (readImageFile for each path, in one pass over the layers holding them). */
export async function readImageFiles(
  store: Store,
  image: ImageRecord,
  paths: readonly string[],
  maxBytes: number,
  tree?: Inode,
): Promise<Map<string, Buffer>> {
  const root = tree ?? (await openImageTree(store, image));
  const wanted = new Map<string, Inode>();
  for (const path of paths) {
    const r = resolveInTree(root, fromText(path));
    if (r?.inode.type !== "file") continue;
    if (r.inode.size > maxBytes) {
      throw new KilnError(
        "TOO_LARGE",
        `${path} in the image is ${formatSize(r.inode.size, "up")}, more than the ${formatSize(maxBytes)} kiln reads from it`,
      );
    }
    wanted.set(path, r.inode);
  }
  const bytes = new Map<Inode, Buffer>();
  await readTreeFiles(store, image, [...wanted.values()], async (inode, data) => {
    const chunks: Buffer[] = [];
    for await (const chunk of data) chunks.push(chunk);
    bytes.set(inode, Buffer.concat(chunks));
  });
  const out = new Map<string, Buffer>();
  for (const [path, inode] of wanted) out.set(path, bytes.get(inode)!);
  return out;
}
