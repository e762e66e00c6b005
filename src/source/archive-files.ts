/**
 * The files of an image archive, whether a tar (read in place at member offsets) or a directory
 * (an OCI layout). The docker-archive and OCI readers only see this interface.
 */
import { createReadStream } from "node:fs";
import { type FileHandle, open, stat } from "node:fs/promises";
import { join, posix } from "node:path";
import { Readable, Transform } from "node:stream";
import { KilnError } from "../errors.js";
import { fromText } from "../io/bytestring.js";
import { formatSize } from "../sizes.js";
import { normalizeMemberName, type TarIndexEntry } from "../tar/scan.js";

export interface StreamOptions {
  readonly signal?: AbortSignal | undefined;
  readonly onBytes?: ((n: number) => void) | undefined;
}

export interface ArchiveFiles {
  /** For messages: the archive's path. */
  readonly path: string;
  /** A member's size (links followed); undefined when the archive has no such file. */
  size(name: string): Promise<number | undefined>;
  /** A small member whole. Missing → INVALID_ARCHIVE naming it; larger than `max` → TOO_LARGE. */
  read(name: string, max: number): Promise<Buffer>;
  /** Streams a member; the stream fails with INVALID_ARCHIVE "truncated" if it yields fewer bytes than the member's size. */
  stream(name: string, opts?: StreamOptions): Promise<Readable>;
  /** Releases what the archive holds (a temporary decompressed copy). */
  close(): Promise<void>;
}

function missing(path: string, name: string): KilnError {
  return new KilnError("INVALID_ARCHIVE", `${path}: missing member "${name}"`);
}

function tooLarge(path: string, name: string, size: number, max: number): KilnError {
  return new KilnError(
    "TOO_LARGE",
    `${path}: member "${name}" is ${formatSize(size, "up")}, more than the ${formatSize(max)} allowed`,
  );
}

/** Passes exactly `size` bytes through; fewer → INVALID_ARCHIVE (the file changed or was cut). */
function exactLength(source: Readable, size: number, what: string, opts: StreamOptions): Readable {
  let seen = 0;
  const counter = new Transform({
    transform(chunk: Buffer, _enc, done) {
      seen += chunk.length;
      opts.onBytes?.(chunk.length);
      done(null, chunk);
    },
    flush(done) {
      if (seen < size) {
        done(
          new KilnError("INVALID_ARCHIVE", `truncated archive: ${what} ended after ${seen} of ${size} bytes`),
        );
      } else done();
    },
  });
  source.on("error", (err) => counter.destroy(err));
  const onAbort = () => {
    const reason = opts.signal?.reason;
    counter.destroy(reason instanceof Error ? reason : new KilnError("INTERNAL", "aborted"));
    source.destroy();
  };
  if (opts.signal?.aborted) onAbort();
  else opts.signal?.addEventListener("abort", onAbort, { once: true });
  counter.on("close", () => {
    opts.signal?.removeEventListener("abort", onAbort);
    source.destroy();
  });
  return source.pipe(counter);
}

async function readRange(fh: FileHandle, offset: number, size: number, what: string): Promise<Buffer> {
  const buf = Buffer.alloc(size);
  let got = 0;
  while (got < size) {
    const { bytesRead } = await fh.read(buf, got, size - got, offset + got);
    if (bytesRead === 0) {
      throw new KilnError(
        "INVALID_ARCHIVE",
        `truncated archive: ${what} ended after ${got} of ${size} bytes`,
      );
    }
    got += bytesRead;
  }
  return buf;
}

const MAX_LINK_HOPS = 32;

/** A tar's members, read at their offsets. Symlinks and hardlinks between members are followed (skopeo's docker archives link `<id>/layer.tar` to `<diffid>.tar`). */
export class TarFiles implements ArchiveFiles {
  constructor(
    readonly path: string,
    private readonly index: Map<string, TarIndexEntry>,
    /** The file actually read: the archive, or its decompressed temporary copy. */
    private readonly file: string = path,
    private readonly cleanup: () => Promise<void> = async () => {},
  ) {}

  /** The regular-file entry a name (text, from the archive's JSON) leads to, or undefined. */
  private lookup(name: string): TarIndexEntry | undefined {
    // The index holds names as the tar does: byte strings.
    let key = normalizeMemberName(fromText(name));
    for (let hop = 0; hop <= MAX_LINK_HOPS; hop++) {
      const e = this.index.get(key);
      if (e === undefined) return undefined;
      if (e.type === "symlink") {
        key = normalizeMemberName(
          e.linkname.startsWith("/") ? e.linkname : posix.join(posix.dirname(key), e.linkname),
        );
        continue;
      }
      if (e.type === "hardlink") {
        key = normalizeMemberName(e.linkname);
        continue;
      }
      if (e.type !== "file") {
        throw new KilnError("INVALID_ARCHIVE", `${this.path}: member "${name}" is a ${e.type}, not a file`);
      }
      if (e.sparse) {
        throw new KilnError(
          "INVALID_ARCHIVE",
          `${this.path}: member "${name}" is a sparse file, which an image archive does not hold`,
        );
      }
      return e;
    }
    throw new KilnError("INVALID_ARCHIVE", `${this.path}: member "${name}": too many levels of links`);
  }

  async size(name: string): Promise<number | undefined> {
    return this.lookup(name)?.size;
  }

  async read(name: string, max: number): Promise<Buffer> {
    const e = this.lookup(name);
    if (e === undefined) throw missing(this.path, name);
    if (e.size > max) throw tooLarge(this.path, name, e.size, max);
    const fh = await open(this.file, "r");
    try {
      return await readRange(fh, e.offset, e.size, `member "${name}" of ${this.path}`);
    } finally {
      await fh.close();
    }
  }

  async stream(name: string, opts: StreamOptions = {}): Promise<Readable> {
    const e = this.lookup(name);
    if (e === undefined) throw missing(this.path, name);
    const source =
      e.size === 0
        ? Readable.from([])
        : createReadStream(this.file, { start: e.offset, end: e.offset + e.size - 1 });
    return exactLength(source, e.size, `member "${name}" of ${this.path}`, opts);
  }

  async close(): Promise<void> {
    await this.cleanup();
  }
}

/** A directory (an OCI image layout). Names never leave it. */
export class DirFiles implements ArchiveFiles {
  constructor(readonly path: string) {}

  private resolve(name: string): string {
    return join(this.path, normalizeMemberName(name));
  }

  async size(name: string): Promise<number | undefined> {
    try {
      const s = await stat(this.resolve(name));
      if (!s.isFile()) throw new KilnError("INVALID_ARCHIVE", `${this.path}: "${name}" is not a file`);
      return s.size;
    } catch (err) {
      if (
        (err as NodeJS.ErrnoException).code === "ENOENT" ||
        (err as NodeJS.ErrnoException).code === "ENOTDIR"
      ) {
        return undefined;
      }
      throw err;
    }
  }

  async read(name: string, max: number): Promise<Buffer> {
    const size = await this.size(name);
    if (size === undefined) throw missing(this.path, name);
    if (size > max) throw tooLarge(this.path, name, size, max);
    const fh = await open(this.resolve(name), "r");
    try {
      const { size: now } = await fh.stat();
      if (now > max) throw tooLarge(this.path, name, now, max);
      return await readRange(fh, 0, now, `"${name}" in ${this.path}`);
    } finally {
      await fh.close();
    }
  }

  async stream(name: string, opts: StreamOptions = {}): Promise<Readable> {
    const size = await this.size(name);
    if (size === undefined) throw missing(this.path, name);
    const source =
      size === 0 ? Readable.from([]) : createReadStream(this.resolve(name), { start: 0, end: size - 1 });
    return exactLength(source, size, `"${name}" in ${this.path}`, opts);
  }

  async close(): Promise<void> {}
}
