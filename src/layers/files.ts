/**
 * The layer blobs of one export. Each blob is opened once and both passes read that same open file,
 * so what pass 2 reads is what pass 1 verified, whatever happens to the store's paths meanwhile.
 *
 * A compressed layer is decompressed and checked against its diff ID (openLayerStream) in pass 1,
 * which also writes the decompressed tar to a spool file (a temp file, within a budget); pass 2
 * reads the spool by position instead of decompressing again, or, for a layer over the budget,
 * decompresses and checks it once more. An uncompressed layer whose diff ID is its blob digest (or that has none) is already verified: the
 * store checked the blob's digest when it took it in, and a blob file is never written again. Such
 * a layer is read by position (FileByteSource): pass 1 reads only its headers, pass 2 only the
 * files that survive, so neither reads the bytes in between.
 */
import { type FileHandle, open, unlink } from "node:fs/promises";
import { KilnError } from "../errors.js";
import { readBuffer } from "../read-buffer.js";
import type { BlobStore } from "../store/blobs.js";
import { FileByteSource } from "../tar/file-source.js";
import type { ByteSource } from "../tar/reader.js";
import { openLayerStream, sniffCompression } from "./decompress.js";

export interface LayerBlob {
  readonly digest: string;
  readonly diffId: string | null;
}

/** Pass 1 reads headers, pass 2 file contents. */
export type LayerPass = "headers" | "content";

/**
 * Reads of 1 MiB: at the stream default of 64 KiB, the per-chunk cost (a thread-pool round trip, the
 * async iterators above it) made reading a layer several times slower than the disk.
 */
const READ_CHUNK = 1 << 20;
/**
 * A header scan reads windows smaller than a content read's (most of a big file's bytes lie between
 * two headers), but not much smaller: each window is a thread-pool round trip, and with 64 KiB the
 * scan of a layer of small files waited on those more than it parsed (debian: 0.42 s, now 0.29 s).
 */
const HEADER_WINDOW = 256 * 1024;

interface Opened {
  fh: FileHandle;
  size: number;
  /** Read by position (uncompressed and already verified). */
  raw: boolean;
  /** A compressed layer's tar as pass 1 decompressed and verified it, once complete. */
  spool?: Spool | undefined;
}

export interface LayerFilesOptions {
  /**
   * Pass 1 keeps the decompressed tar of compressed layers in files named PREFIX-N (temp files, in
   * the page cache while they live), so pass 2 reads them instead of decompressing again.
   */
  spoolPrefix?: string | undefined;
  /**
   * Decompressed bytes spooled at most, over all layers (a budget may be shared with a prefetch); a
   * layer beyond it is decompressed twice.
   */
  spoolBudget?: number | SpoolBudget | undefined;
}

export class LayerFiles {
  readonly #blobs: BlobStore;
  readonly #layers: readonly LayerBlob[];
  readonly #label: (i: number) => string;
  readonly #opened = new Map<number, Promise<Opened>>();
  /** Spools made elsewhere (a prefetch during the pull), for layers not opened yet. */
  readonly #adopted = new Map<number, Spool>();
  readonly #spoolPrefix: string | undefined;
  readonly #budget: SpoolBudget;

  constructor(
    blobs: BlobStore,
    layers: readonly LayerBlob[],
    label: (i: number) => string,
    opts: LayerFilesOptions = {},
  ) {
    this.#blobs = blobs;
    this.#layers = layers;
    this.#label = label;
    this.#spoolPrefix = opts.spoolPrefix;
    const budget = opts.spoolBudget ?? 0;
    this.#budget = typeof budget === "number" ? new SpoolBudget(budget) : budget;
  }

  #open(i: number): Promise<Opened> {
    let p = this.#opened.get(i);
    if (!p) {
      p = this.#openBlob(i);
      // Awaited by the caller; close() awaits it again and must not see an unhandled rejection.
      p.catch(() => {});
      this.#opened.set(i, p);
    }
    return p;
  }

  async #openBlob(i: number): Promise<Opened> {
    const layer = this.#layers[i]!;
    let fh: FileHandle;
    try {
      fh = await open(this.#blobs.path(layer.digest), "r");
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === "ENOENT") {
        throw new KilnError("NOT_FOUND", `blob ${layer.digest} is not in the store`, {
          cause: err,
          details: { digest: layer.digest },
        });
      }
      throw err;
    }
    try {
      const { size } = await fh.stat();
      const head = Buffer.alloc(4);
      const { bytesRead } = await fh.read(head, 0, head.length, 0);
      const verified = layer.diffId === null || layer.diffId.toLowerCase() === layer.digest.toLowerCase();
      const raw = verified && sniffCompression(head.subarray(0, bytesRead)) === "none";
      const spool = this.#adopted.get(i);
      this.#adopted.delete(i);
      return { fh, size, raw, spool };
    } catch (err) {
      await fh.close();
      throw err;
    }
  }

  /**
   * Layer i's uncompressed tar for one pass: a ByteSource read by position, or a decompressed
   * stream checked against the diff ID at its end. `onBytes` counts the blob bytes passed over
   * (read or skipped).
   */
  async tar(
    i: number,
    pass: LayerPass,
    onBytes?: ((n: number) => void) | undefined,
    /** Pass 2's consumer copies each chunk before asking for the next: windows may be reused. */
    transient = false,
  ): Promise<AsyncIterable<Buffer> | ByteSource> {
    const opened = await this.#open(i);
    const { fh, size, raw, spool } = opened;
    if (raw) {
      return new FileByteSource(fh, size, {
        window: pass === "headers" ? HEADER_WINDOW : READ_CHUNK,
        readAhead: pass === "content" ? true : "sequential",
        reuse: pass === "content" && transient,
        onAdvance: onBytes,
      });
    }
    if (pass === "content" && spool?.complete) {
      // Progress counts compressed bytes: the spool's bytes scaled to the blob's.
      let read = 0;
      let told = 0;
      const scaled = onBytes
        ? (n: number) => {
            read += n;
            const now = spool.size > 0 ? Math.floor((read * size) / spool.size) : size;
            onBytes(now - told);
            told = now;
          }
        : undefined;
      return new FileByteSource(spool.fh, spool.size, {
        window: READ_CHUNK,
        reuse: transient,
        onAdvance: scaled,
      });
    }
    const layer = this.#layers[i]!;
    const stream = openLayerStream(readChunks(fh, size, onBytes), {
      diffId: layer.diffId ?? undefined,
      label: this.#label(i),
    });
    if (pass !== "headers" || this.#spoolPrefix === undefined || this.#budget.left <= 0) return stream;
    const file = `${this.#spoolPrefix}-${i}`;
    const created = new Spool(await open(file, "wx+"), file);
    await spool?.discard();
    opened.spool = created;
    return spoolThrough(stream, created, this.#budget);
  }

  /**
   * Takes over layer i's decompressed tar, spooled whole and verified by a pass 1 run elsewhere
   * (src/layers/prefetch.ts), for pass 2 to read. Call before the layer is opened.
   */
  adoptSpool(i: number, spool: Spool): void {
    this.#adopted.set(i, spool);
  }

  /** Closes every blob opened and removes the spools. Call once no read is in flight. */
  async close(): Promise<void> {
    for (const spool of this.#adopted.values()) await spool.discard();
    this.#adopted.clear();
    const all = [...this.#opened.values()];
    this.#opened.clear();
    for (const p of all) {
      const opened = await p.catch(() => undefined);
      await opened?.spool?.discard();
      await opened?.fh.close();
    }
  }
}

/** A file's bytes in 1 MiB chunks, the next one read while the current one is used. */
async function* readChunks(
  fh: FileHandle,
  size: number,
  onBytes: ((n: number) => void) | undefined,
): AsyncGenerator<Buffer> {
  const readAt = (pos: number) => {
    const p = (async () => {
      const buf = readBuffer(pos, Math.min(READ_CHUNK, size - pos));
      const { bytesRead } = await fh.read(buf, 0, buf.length, pos);
      return buf.subarray(0, bytesRead);
    })();
    p.catch(() => {}); // a read ahead nobody awaits (the consumer stopped) must not be unhandled
    return p;
  };
  let pos = 0;
  let next = size > 0 ? readAt(0) : undefined;
  while (next) {
    const buf = await next;
    if (buf.length === 0) {
      throw new KilnError("INVALID_ARCHIVE", `the blob shrank while it was read (offset ${pos})`);
    }
    pos += buf.length;
    next = pos < size ? readAt(pos) : undefined;
    onBytes?.(buf.length);
    yield buf;
  }
}

/** Decompressed bytes the spools of one export may still take; shared by everything that spools for it. */
export class SpoolBudget {
  constructor(public left: number) {}
}

/**
 * Passes `src` on and writes it to `spool` while the budget lasts; the spool is complete once `src`
 * ended cleanly. A spool given up (over budget, or its read stopped early) gives its bytes back.
 */
export async function* spoolThrough(
  src: AsyncIterable<Buffer>,
  spool: Spool,
  budget: SpoolBudget,
): AsyncGenerator<Buffer> {
  const giveUp = async () => {
    if (spool.abandoned) return;
    budget.left += spool.size;
    await spool.abandon();
  };
  let ended = false;
  try {
    for await (const chunk of src) {
      if (!spool.abandoned) {
        if (chunk.length > budget.left) await giveUp();
        else {
          budget.left -= chunk.length;
          await spool.append(chunk);
        }
      }
      yield chunk;
    }
    ended = true;
  } finally {
    if (ended) await spool.finish();
    else await giveUp();
  }
}

/**
 * Writes in flight at most, per spool, before the reader waits for them: two of the decompressor's
 * 1 MiB chunks (each queued MiB is resident, per layer).
 */
const SPOOL_BACKLOG = 2 << 20;

/** A decompressed layer written to a temp file as pass 1 reads it. */
export class Spool {
  size = 0;
  complete = false;
  abandoned = false;
  #writes: Promise<void> = Promise.resolve();
  #backlog = 0;
  #error: unknown;

  constructor(
    readonly fh: FileHandle,
    private readonly file: string,
  ) {}

  /** Queues `chunk` at the end (written in order); waits only when much is still in flight. */
  async append(chunk: Buffer): Promise<void> {
    const at = this.size;
    this.size += chunk.length;
    this.#backlog += chunk.length;
    this.#writes = this.#writes.then(async () => {
      if (this.#error !== undefined || this.abandoned) return;
      try {
        for (let done = 0; done < chunk.length; ) {
          done += (await this.fh.write(chunk, done, chunk.length - done, at + done)).bytesWritten;
        }
      } catch (err) {
        this.#error = err;
      } finally {
        this.#backlog -= chunk.length;
      }
    });
    if (this.#backlog > SPOOL_BACKLOG) await this.#writes;
  }

  /** The source ended cleanly (verified): usable once every write landed. */
  async finish(): Promise<void> {
    await this.#writes;
    // A failed write (disk full) only costs pass 2 a second decompression.
    if (this.#error !== undefined) await this.abandon();
    else if (!this.abandoned) this.complete = true;
  }

  /** Stops spooling this layer (over budget, or its read stopped early) and removes the file. */
  async abandon(): Promise<void> {
    if (this.abandoned) return;
    this.abandoned = true;
    await this.discard();
  }

  async discard(): Promise<void> {
    this.complete = false;
    this.abandoned = true;
    await this.#writes;
    await this.fh.close().catch(() => {});
    await unlink(this.file).catch(() => {});
  }
}
