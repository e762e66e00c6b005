import { createHash } from "node:crypto";
import { createReadStream, createWriteStream, fdatasync as fdatasyncCb, openSync } from "node:fs";
import {
  type FileHandle,
  lstat,
  mkdir,
  mkdtemp,
  open,
  opendir,
  rename,
  rm,
  unlink,
  writeFile,
} from "node:fs/promises";
import { join } from "node:path";
import type { Readable } from "node:stream";
import { pipeline } from "node:stream/promises";
import { promisify } from "node:util";
import { KilnError } from "../errors.js";
import { parseDigest } from "../reference/digest.js";
import { WriteBehind } from "../write-behind.js";
import { storeLayout } from "./root.js";

const HEX64 = /^[0-9a-f]{64}$/;
const fdatasync = promisify(fdatasyncCb);

/**
 * Content-addressed blobs, `blobs/sha256/<hex>`, shared by every image. A file appears at its final
 * path only by an atomic rename of a complete, verified, fsynced temp file (see `Staging`), so a
 * reader never sees a partial blob.
 */
export class BlobStore {
  readonly root: string;
  /** `blobs/sha256` */
  readonly dir: string;
  readonly tmpDir: string;

  constructor(root: string) {
    const layout = storeLayout(root);
    this.root = root;
    this.dir = layout.blobsDir;
    this.tmpDir = layout.tmpDir;
  }

  /** The final path of a blob. Throws INVALID_REFERENCE for a malformed or non-sha256 digest. */
  path(digest: string): string {
    return join(this.dir, sha256Hex(digest));
  }

  /** Whether the blob is present (and, when `size` is given, has that size). */
  async has(digest: string, size?: number): Promise<boolean> {
    try {
      const st = await lstat(this.path(digest));
      return st.isFile() && (size === undefined || st.size === size);
    } catch (err) {
      if (isErrno(err, "ENOENT")) return false;
      throw err;
    }
  }

  /** Opens a blob for reading. The file is opened now, so a later delete cannot break the stream. */
  open(digest: string): Readable {
    const file = this.path(digest);
    let fd: number;
    try {
      fd = openSync(file, "r");
    } catch (err) {
      if (isErrno(err, "ENOENT")) throw notFound(digest, err);
      throw err;
    }
    return createReadStream(file, { fd });
  }

  /** Reads a small blob (manifest, config) whole; TOO_LARGE beyond `maxBytes`. */
  async readBytes(digest: string, maxBytes: number): Promise<Buffer> {
    let fh: FileHandle;
    try {
      fh = await open(this.path(digest), "r");
    } catch (err) {
      if (isErrno(err, "ENOENT")) throw notFound(digest, err);
      throw err;
    }
    try {
      const { size } = await fh.stat();
      if (size > maxBytes) {
        throw new KilnError(
          "TOO_LARGE",
          `blob ${digest} is ${size} bytes, more than the ${maxBytes} allowed`,
          {
            details: { digest, size, maxBytes },
          },
        );
      }
      const buf = Buffer.alloc(size);
      let off = 0;
      while (off < size) {
        const { bytesRead } = await fh.read(buf, off, size - off, off);
        if (bytesRead === 0) break;
        off += bytesRead;
      }
      return buf.subarray(0, off);
    } finally {
      await fh.close();
    }
  }

  /** A new staging area (a private dir under `tmp/`) for one operation's blobs. */
  async stage(): Promise<Staging> {
    await mkdir(this.tmpDir, { recursive: true });
    const dir = await mkdtemp(join(this.tmpDir, `stage-${process.pid}-`));
    return new DirStaging(this, dir);
  }

  /**
   * Publishes a complete file the caller has verified to hash to `digest` (an upload assembled under
   * tmp/, too big to copy through a Staging): fsync, rename into place, fsync the directory. An
   * existing blob of the same size is kept and the file removed.
   */
  async publishFile(file: string, digest: string, size: number): Promise<void> {
    const final = this.path(digest);
    await fsyncPath(file);
    await mkdir(this.dir, { recursive: true });
    if (await this.has(digest, size)) {
      await rm(file, { force: true });
      return;
    }
    await rename(file, final);
    await fsyncPath(this.dir);
  }

  /** Deletes a blob; absent is fine. Callers decide what is unreferenced (see removeImages). */
  async delete(digest: string): Promise<void> {
    try {
      await unlink(this.path(digest));
    } catch (err) {
      if (!isErrno(err, "ENOENT")) throw err;
    }
  }

  /** Every blob in the store, in no particular order. */
  async *list(): AsyncIterable<{ digest: string; size: number }> {
    let dir: Awaited<ReturnType<typeof opendir>>;
    try {
      dir = await opendir(this.dir);
    } catch (err) {
      if (isErrno(err, "ENOENT")) return;
      throw err;
    }
    for await (const entry of dir) {
      if (!HEX64.test(entry.name)) continue;
      try {
        const st = await lstat(join(this.dir, entry.name));
        if (st.isFile()) yield { digest: `sha256:${entry.name}`, size: st.size };
      } catch (err) {
        // Deleted by another process while listing.
        if (!isErrno(err, "ENOENT")) throw err;
      }
    }
  }
}

/**
 * One operation's blobs, written and verified in a private directory, published together by
 * `commit`, or dropped by `discard`: a failed pull leaves the store unchanged.
 */
export interface Staging {
  /** The staging directory (under the store's `tmp/`). */
  readonly dir: string;
  /**
   * Streams input into a temp file inside the staging dir while hashing; aborts as soon as more
   * than expected.size bytes arrive; at the end checks size and sha256 → KilnError DIGEST_MISMATCH
   * (naming expected and actual digest and `what`) with the temp file removed. Skips nothing: the
   * caller decides whether to fetch. Returns bytes written. Several writes may run at once.
   */
  write(
    expected: { digest: string; size?: number | undefined; what?: string | undefined },
    input: Readable | AsyncIterable<Uint8Array>,
  ): Promise<number>;
  /** Stages a small in-memory blob (manifest, config); checks `expectedDigest` if given. Returns its digest. */
  writeBytes(bytes: Buffer, expectedDigest?: string): Promise<string>;
  /**
   * fsyncs each staged file, renames each into blobs/sha256/ (atomic; an existing blob of the same
   * size is kept), fsyncs the directory, removes the staging dir. Call once no write is in flight.
   */
  commit(): Promise<void>;
  /** Removes everything staged. Idempotent; a no-op after commit. */
  discard(): Promise<void>;
}

class DirStaging implements Staging {
  readonly dir: string;
  readonly #blobs: BlobStore;
  /** digest → temp file of a verified blob */
  readonly #staged = new Map<string, { file: string; size: number; synced: boolean }>();
  #seq = 0;
  #done = false;

  constructor(blobs: BlobStore, dir: string) {
    this.#blobs = blobs;
    this.dir = dir;
  }

  async write(
    expected: { digest: string; size?: number | undefined; what?: string | undefined },
    input: Readable | AsyncIterable<Uint8Array>,
  ): Promise<number> {
    this.#checkOpen();
    const hex = sha256Hex(expected.digest);
    const want = `sha256:${hex}`;
    const what = expected.what ?? `blob ${want}`;
    const file = join(this.dir, `${hex}.${this.#seq++}`);
    const hash = createHash("sha256");
    let n = 0;
    // Two of ingest's 512 KiB pieces: writes stay large, and little waits in memory for the disk
    // (4 MiB per layer here, with the queues after it, added about 15 MB to a big pull's peak RSS).
    const out = createWriteStream(file, { flags: "wx", highWaterMark: 1 << 20 });
    // Durable once verified: written back while the download runs, rather than all at the end.
    // Only the generator below starts write-backs, and it waits for the last before the stream
    // ends and closes its descriptor.
    let fd: number | undefined;
    out.once("open", (opened: number) => {
      fd = opened;
    });
    const behind = new WriteBehind(() => (fd === undefined ? Promise.resolve() : fdatasync(fd)));
    try {
      await pipeline(
        input,
        async function* (source: AsyncIterable<Uint8Array>) {
          try {
            for await (const chunk of source) {
              n += chunk.length;
              if (expected.size !== undefined && n > expected.size) {
                // Stop now: pipeline destroys the input, so a runaway download ends here.
                throw new KilnError(
                  "DIGEST_MISMATCH",
                  `${what}: more than the expected ${expected.size} bytes arrived (expected ${want})`,
                  { details: { expected: want, expectedSize: expected.size, what } },
                );
              }
              hash.update(chunk);
              behind.wrote(chunk.length);
              yield chunk;
            }
          } finally {
            await behind.settle().catch(() => {});
          }
        },
        out,
      );
      const actual = `sha256:${hash.digest("hex")}`;
      if (expected.size !== undefined && n !== expected.size) {
        throw new KilnError(
          "DIGEST_MISMATCH",
          `${what}: got ${n} bytes (${actual}), expected ${expected.size} bytes (${want})`,
          { details: { expected: want, actual, expectedSize: expected.size, actualSize: n, what } },
        );
      }
      if (actual !== want) {
        throw new KilnError("DIGEST_MISMATCH", `${what}: content has digest ${actual}, expected ${want}`, {
          details: { expected: want, actual, size: n, what },
        });
      }
      await behind.settle();
      // Durable now, while other downloads still run, rather than all at once in commit.
      await fsyncPath(file);
    } catch (err) {
      // The stream opens its file asynchronously: an input that fails at once can reject the
      // pipeline before the open, which would then create the file after the rm below.
      if (!out.closed) await new Promise<void>((resolve) => out.once("close", () => resolve()));
      await rm(file, { force: true });
      throw err;
    }
    if (this.#staged.has(want)) await rm(file, { force: true });
    else this.#staged.set(want, { file, size: n, synced: true });
    return n;
  }

  async writeBytes(bytes: Buffer, expectedDigest?: string): Promise<string> {
    this.#checkOpen();
    const digest = `sha256:${createHash("sha256").update(bytes).digest("hex")}`;
    if (expectedDigest !== undefined) {
      const want = `sha256:${sha256Hex(expectedDigest)}`;
      if (digest !== want) {
        throw new KilnError("DIGEST_MISMATCH", `blob content has digest ${digest}, expected ${want}`, {
          details: { expected: want, actual: digest, size: bytes.length },
        });
      }
    }
    if (this.#staged.has(digest)) return digest;
    const file = join(this.dir, `${digest.slice(7)}.${this.#seq++}`);
    await writeFile(file, bytes, { flag: "wx" });
    this.#staged.set(digest, { file, size: bytes.length, synced: false });
    return digest;
  }

  async commit(): Promise<void> {
    this.#checkOpen();
    const entries = [...this.#staged.entries()];
    // Durable content before the names that point at it.
    if (entries.length === 0) {
      // Nothing new (a warm pull): no rename, so no directory to make durable.
      this.#done = true;
      await rm(this.dir, { recursive: true, force: true });
      return;
    }
    await Promise.all(entries.filter(([, e]) => !e.synced).map(([, { file }]) => fsyncPath(file)));
    await mkdir(this.#blobs.dir, { recursive: true });
    for (const [digest, { file, size }] of entries) {
      const final = this.#blobs.path(digest);
      // Another process may have published the same blob: keep it (same name, same size means
      // same verified content). A wrong-sized file there is replaced; rename is atomic either way,
      // and two processes renaming identical files over each other is harmless.
      if (await this.#blobs.has(digest, size)) await rm(file, { force: true });
      else await rename(file, final);
    }
    await fsyncPath(this.#blobs.dir);
    this.#done = true;
    this.#staged.clear();
    await rm(this.dir, { recursive: true, force: true });
  }

  async discard(): Promise<void> {
    this.#done = true;
    this.#staged.clear();
    await rm(this.dir, { recursive: true, force: true });
  }

  #checkOpen(): void {
    if (this.#done)
      throw new KilnError("INTERNAL", `staging area ${this.dir} was already committed or discarded`);
  }
}

/** The hex of a sha256 digest; INVALID_REFERENCE for anything else (so no path can escape the store). */
function sha256Hex(digest: string): string {
  const d = parseDigest(digest);
  if (d.algorithm !== "sha256") {
    throw new KilnError(
      "INVALID_REFERENCE",
      `unsupported digest "${digest}": the store keeps sha256 blobs only`,
    );
  }
  return d.hex;
}

/** fsync a file or directory (directories where the filesystem allows it). */
export async function fsyncPath(path: string): Promise<void> {
  const fh = await open(path, "r");
  try {
    await fh.sync();
  } catch (err) {
    // Some filesystems refuse fsync on a directory; the rename is still atomic.
    if (!isErrno(err, "EINVAL") && !isErrno(err, "EISDIR") && !isErrno(err, "EPERM")) throw err;
  } finally {
    await fh.close();
  }
}

function notFound(digest: string, cause: unknown): KilnError {
  return new KilnError("NOT_FOUND", `blob ${digest} is not in the store`, { cause, details: { digest } });
}

function isErrno(err: unknown, code: string): boolean {
  return (err as NodeJS.ErrnoException | undefined)?.code === code;
}
