/**
 * Writes a tree as a newc cpio archive (optionally gzip-compressed) for use as an initramfs.
 *
 * Entry order. File bytes can only be read in dataOrder (layer, then offset), not in walk order,
 * and holding whole files in memory is not allowed. So the archive is laid out in three runs:
 *   1. every directory, the root first as ".", in walk order (parents before children);
 *   2. every other name that carries no file data (symlinks, devices, fifos, sockets, empty files,
 *      and all but the last name of a hardlinked file), in walk order;
 *   3. one entry per file with data, in dataOrder, its bytes streamed straight from the source.
 * Both consumers need nothing more: the kernel (init/initramfs.c) and `cpio -i` create an entry
 * with a plain open/mknod/symlink in a directory that must already exist, which run 1 guarantees,
 * and neither needs any other order. The kernel records directory mtimes and sets them after the
 * last entry (dir_utime), so files created later do not disturb them. (GNU cpio sets a directory's
 * time when it creates it, so it loses the times of non-empty directories for any archive the
 * kernel can read, whose parents must come first.)
 *
 * Every byte is copied into large staging buffers: the DataStream the ext4 and EROFS data areas use
 * (with gzip, 1 MiB pieces handed to zlib first, its output to the DataStream). So the ContentSource
 * may reuse its buffers (ContentOptions transient): a layer is then read into a ring of buffers
 * instead of a fresh one per MiB.
 *
 * Hardlinks (newc convention, as GNU cpio writes them): every name of an inode has the same ino
 * and the inode's nlink; the data goes with the last name only, the others have size 0. The
 * kernel creates the first name, links later names to it (keyed by ino, devmajor/minor and type)
 * and writes the data of the later entry through the link without truncating; `cpio -i` defers
 * size-0 names until the data arrives. Hardlinked symlinks come out as separate symlinks (neither
 * consumer links symlinks).
 *
 * Not representable, by design: xattrs (newc has no field; the kernel's only way is a non-standard
 * METADATA!!! extension, not used; writeCpio reports the files that had some), sub-second times, times outside 1970..2106 (clamped), file
 * sizes of 4 GiB and more and paths longer than the kernel's PATH_MAX (both TOO_LARGE, naming the
 * file: the kernel would silently drop such entries).
 */
import { once } from "node:events";
import { open, unlink } from "node:fs/promises";
import { pipeline } from "node:stream/promises";
import { createGzip } from "node:zlib";
import { KilnError } from "../../errors.js";
import { showBytes, toBytes } from "../../io/bytestring.js";
import { DataStream, openDirect } from "../datastream.js";
import { regionPieces } from "../sparse.js";
import {
  type ContentSource,
  checkOwner,
  dataOrder,
  type Inode,
  linkCounts,
  type WalkItem,
  walk,
} from "../tree.js";
import {
  encodeEntry,
  encodeTrailer,
  KERNEL_PATH_MAX,
  MAX_FIELD,
  MAX_HEADER,
  modeField,
  pad4,
} from "./header.js";

export interface CpioOptions {
  /** "gzip": one gzip member around the archive (what `--compress gzip` gives). Default "none". */
  compress?: "gzip" | "none";
  /** Seconds written as every entry's mtime instead of the inodes' own (e.g. SOURCE_DATE_EPOCH). */
  mtimeOverride?: number;
}

/** zlib's default level: level 9 is much slower for a few percent smaller output at best. */
const GZIP_LEVEL = 6;
/** zlib's output chunks, and the pieces of archive handed to it. */
const CHUNK = 64 * 1024;
const PIECE = 1024 * 1024;
/** The archive is padded with zeros to a multiple of this, as GNU cpio does (its block size). */
const BLOCK = 512;
const ZEROS = Buffer.alloc(BLOCK);

/** Where the archive's bytes go. put copies what it is given: the caller may reuse it at once. */
interface ArchiveSink {
  put(chunk: Buffer, from?: number, to?: number): Promise<void>;
  /** `n` zero bytes (a hole of a sparse file, which newc cannot hold). */
  zeros(n: number): Promise<void>;
  end(): Promise<void>;
}

/** Shared zeros that sinks copy from (never written into). */
const ZERO_PIECE = Buffer.alloc(PIECE);

/** The archive straight to the data stream: zeros are a seek there (they stay holes of the output). */
function plainSink(stream: DataStream): ArchiveSink {
  return {
    put: (chunk, from, to) => stream.put(chunk, from, to),
    zeros: (n) => stream.seek(stream.position + n),
    end: () => stream.end(),
  };
}

/**
 * gzip around the archive: the bytes go to zlib in 1 MiB pieces (it keeps them until read), and
 * what it makes goes on to the data stream.
 */
class GzipSink implements ArchiveSink {
  readonly #gzip = createGzip({ level: GZIP_LEVEL, chunkSize: CHUNK });
  readonly #written: Promise<void>;
  #piece = Buffer.allocUnsafe(PIECE);
  #fill = 0;

  constructor(out: DataStream) {
    this.#written = pipeline(this.#gzip, async (compressed: AsyncIterable<Buffer>) => {
      for await (const chunk of compressed) await out.put(chunk);
      await out.end();
    });
    this.#written.catch(() => {}); // surfaces through put or end
  }

  async put(chunk: Buffer, from = 0, to = chunk.length): Promise<void> {
    while (from < to) {
      const n = Math.min(to - from, PIECE - this.#fill);
      chunk.copy(this.#piece, this.#fill, from, from + n);
      this.#fill += n;
      from += n;
      if (this.#fill === PIECE) await this.#hand();
    }
  }

  async zeros(n: number): Promise<void> {
    for (let left = n; left > 0; left -= PIECE) await this.put(ZERO_PIECE, 0, Math.min(left, PIECE));
  }

  async end(): Promise<void> {
    if (this.#fill > 0) await this.#hand();
    this.#gzip.end();
    await this.#written;
  }

  /** After a failure elsewhere: stops zlib, and with it the writes. */
  async abort(): Promise<void> {
    this.#gzip.destroy();
    await this.#written.catch(() => {});
  }

  async #hand(): Promise<void> {
    const piece = this.#piece.subarray(0, this.#fill);
    this.#piece = Buffer.allocUnsafe(PIECE);
    this.#fill = 0;
    if (!this.#gzip.write(piece)) await Promise.race([once(this.#gzip, "drain"), this.#written]);
  }
}

/** The xattrs an archive could not carry: how many inodes had some, and the first few. */
export interface DroppedXattrs {
  /** Inodes with xattrs (a hardlinked file counts once). */
  count: number;
  /** The paths of the first inodes with xattrs, in archive walk order, with a leading slash. */
  first: string[];
  /** The xattr names seen, sorted. */
  names: string[];
}

/** How many paths DroppedXattrs names. */
const DROPPED_SHOWN = 3;

interface Plan {
  dropped: DroppedXattrs;
  /** Runs 1 and 2: entries without file data, in archive order. */
  metadata: WalkItem[];
  /** Run 3: files with data, in dataOrder, with the name that carries their bytes. */
  files: Inode[];
  dataPath: Map<Inode, string>;
  ino: Map<Inode, number>;
  nlink: Map<Inode, number>;
}

const display = (path: string): string => `/${showBytes(path)}`;

function plan(root: Inode): Plan {
  const items = [...walk(root)];
  const ino = new Map<Inode, number>();
  const dataPath = new Map<Inode, string>();
  const dropped: DroppedXattrs = { count: 0, first: [], names: [] };
  const names = new Set<string>();
  for (const item of items) {
    const { inode, path } = item;
    // Deterministic inode numbers: walk order, from 1 (0 reads as "no inode" to some tools).
    if (!ino.has(inode)) {
      ino.set(inode, ino.size + 1);
      if (inode.xattrs.size > 0) {
        dropped.count++;
        if (dropped.first.length < DROPPED_SHOWN) dropped.first.push(display(path));
        for (const name of inode.xattrs.keys()) names.add(name);
      }
    }
    checkOwner(inode, display(path));
    if (inode.type === "file") {
      if (inode.size > MAX_FIELD) {
        throw new KilnError(
          "TOO_LARGE",
          `cpio: ${display(path)} is ${inode.size} bytes; newc cannot store files of 4 GiB or more`,
          { details: { path: display(path), size: inode.size } },
        );
      }
      if (inode.size > 0 && !inode.data) {
        throw new KilnError("INVALID_ARGUMENT", `cpio: ${display(path)} has ${inode.size} bytes but no data`);
      }
      // The last name wins: later names overwrite earlier ones.
      if (inode.data) dataPath.set(inode, path);
    }
    const nameBytes = (path === "" ? 1 : path.length) + 1; // a byte string: one character a byte
    if (nameBytes > KERNEL_PATH_MAX) {
      throw new KilnError(
        "TOO_LARGE",
        `cpio: path ${display(path).slice(0, 80)}… is ${nameBytes - 1} bytes; the kernel's initramfs unpacker skips paths over ${KERNEL_PATH_MAX - 1}`,
        { details: { path: display(path) } },
      );
    }
    if (inode.type === "symlink" && inode.target.length > KERNEL_PATH_MAX) {
      throw new KilnError(
        "TOO_LARGE",
        `cpio: symlink ${display(path)} has a target over ${KERNEL_PATH_MAX} bytes, which the kernel skips`,
        { details: { path: display(path) } },
      );
    }
  }
  const dirs = items.filter((i) => i.inode.type === "directory");
  const others = items.filter((i) => i.inode.type !== "directory" && dataPath.get(i.inode) !== i.path);
  dropped.names = [...names].sort();
  return {
    dropped,
    metadata: [...dirs, ...others],
    files: dataOrder(root),
    dataPath,
    ino,
    nlink: linkCounts(root),
  };
}

function clampTime(seconds: number): number {
  return Math.min(MAX_FIELD, Math.max(0, Math.floor(seconds)));
}

/** Writes the archive to `sink` and ends it. */
async function writeArchive(
  p: Plan,
  content: ContentSource,
  mtimeOverride: number | undefined,
  sink: ArchiveSink,
): Promise<void> {
  let total = 0;
  const put = (b: Buffer, from = 0, to = b.length): Promise<void> => {
    total += to - from;
    return sink.put(b, from, to);
  };
  const zeros = (n: number): Promise<void> => {
    total += n;
    return sink.zeros(n);
  };
  // One header at a time, copied out by put before the next is encoded.
  const scratch = Buffer.alloc(MAX_HEADER);
  const header = (inode: Inode, path: string, filesize: number): Promise<void> =>
    put(
      scratch,
      0,
      encodeEntry(
        {
          ino: p.ino.get(inode)!,
          mode: modeField(inode.type, inode.mode),
          uid: inode.uid,
          gid: inode.gid,
          nlink: p.nlink.get(inode) ?? 1,
          mtime: clampTime(mtimeOverride ?? inode.mtime),
          filesize,
          rdevMajor: inode.type === "char" || inode.type === "block" ? inode.rdevMajor : 0,
          rdevMinor: inode.type === "char" || inode.type === "block" ? inode.rdevMinor : 0,
          name: path === "" ? "." : path,
        },
        scratch,
      ),
    );

  for (const { inode, path } of p.metadata) {
    if (inode.type === "symlink") {
      const target = toBytes(inode.target);
      await header(inode, path, target.length);
      await put(target);
      await put(ZEROS, 0, pad4(target.length));
    } else {
      await header(inode, path, 0);
    }
  }

  let next = 0;
  for await (const { inode, data } of content.contents(p.files, { transient: true })) {
    const expected = p.files[next++];
    const path = expected ? p.dataPath.get(expected)! : "";
    if (inode !== expected) {
      throw new KilnError(
        "INTERNAL",
        `cpio: content source delivered files out of order at ${display(path)}`,
      );
    }
    await header(inode, path, inode.size);
    let got = 0;
    const regions = inode.data?.sparse;
    if (regions) {
      // Only the data regions arrive: the holes between them are zeros here.
      for await (const piece of regionPieces(regions, data, () => display(path))) {
        await zeros(piece.offset - got);
        await put(piece.bytes);
        got = piece.offset + piece.bytes.length;
      }
      await zeros(inode.size - got);
      got = inode.size;
    } else {
      for await (const chunk of data) {
        got += chunk.length;
        if (got > inode.size) break;
        await put(chunk);
      }
    }
    if (got !== inode.size) {
      throw new KilnError(
        "SIZE_MISMATCH",
        `cpio: ${display(path)} should have ${inode.size} bytes but its content ${got > inode.size ? "is longer" : `has ${got}`}`,
      );
    }
    await put(ZEROS, 0, pad4(inode.size));
  }
  if (next !== p.files.length) {
    const path = p.dataPath.get(p.files[next]!)!;
    throw new KilnError("INTERNAL", `cpio: content source ended before ${display(path)}`);
  }

  await put(scratch, 0, encodeTrailer(scratch));
  await put(ZEROS, 0, (BLOCK - (total % BLOCK)) % BLOCK);
  await sink.end();
}

/**
 * Writes `root` as a newc cpio archive to `out` (created or truncated; callers pass a temp path
 * and rename it), streaming: file bytes are read once through `content` in dataOrder and never
 * held whole. The output is fsynced before the promise resolves; on failure the partial file is
 * removed. `bytes` is the size of the written file (compressed size with gzip); `droppedXattrs`
 * what newc could not carry, for the caller to tell the user.
 *
 * Reproducible: entry order, inode numbers and times come from the tree only. The gzip header has
 * no name and mtime 0 (Node's zlib writes none), so output depends only on the tree and zlib.
 */
export async function writeCpio(
  root: Inode,
  content: ContentSource,
  out: string,
  opts: CpioOptions = {},
): Promise<{ bytes: number; droppedXattrs: DroppedXattrs }> {
  const compress = opts.compress ?? "none";
  if (compress !== "gzip" && compress !== "none") {
    throw new KilnError("INVALID_ARGUMENT", `cpio: unknown compression ${String(compress)} (gzip or none)`);
  }
  const mtime = opts.mtimeOverride;
  if (mtime !== undefined && (!Number.isInteger(mtime) || mtime < 0 || mtime > MAX_FIELD)) {
    throw new KilnError("INVALID_ARGUMENT", `cpio: mtime override ${mtime} is not a time in 1970..2106`);
  }
  if (root.type !== "directory") {
    throw new KilnError("INVALID_ARGUMENT", `cpio: the root must be a directory, not a ${root.type}`);
  }
  const p = plan(root);

  const fh = await open(out, "w", 0o644);
  const direct = await openDirect(out);
  let ok = false;
  try {
    const stream = new DataStream(fh, 0, direct);
    if (compress === "gzip") {
      const gzip = new GzipSink(stream);
      await writeArchive(p, content, mtime, gzip).catch(async (err: unknown) => {
        await gzip.abort();
        throw err;
      });
    } else {
      await writeArchive(p, content, mtime, plainSink(stream));
    }
    // The data stream leaves all-zero blocks as holes, the last one included: size the file.
    await fh.truncate(stream.position);
    await fh.sync();
    const { size } = await fh.stat();
    ok = true;
    return { bytes: size, droppedXattrs: p.dropped };
  } finally {
    await direct?.close();
    await fh.close();
    if (!ok) await unlink(out).catch(() => {});
  }
}
