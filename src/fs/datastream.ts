/**
 * The data area of a filesystem image as one sequential stream. Writers allocate file blocks back
 * to back in dataOrder, so file bytes (each file padded to a block) fill large buffers whatever the
 * file sizes: few, large writes, and no per-block bookkeeping. Two buffers: one fills while the
 * other is being written. All-zero blocks are not written: they stay holes of the output file
 * (which the writer has sized beforehand), so images stay sparse.
 */
import type { FileHandle } from "node:fs/promises";
import { KilnError } from "../errors.js";

/**
 * Written bytes after which the stream asks the kernel to write them back (fdatasync, one at a
 * time, not awaited): every image is fsynced once it is complete, and without this the disk would
 * sit idle while the image is written, then take all of it at the end. Small enough that one sync
 * never holds a thread-pool thread for long.
 */
const WRITE_BEHIND = 32 << 20;

/** Both ext4 and EROFS images here use 4 KiB blocks. */
const BLOCK = 4096;
const CHUNK = 1 << 20;
const ZERO = Buffer.alloc(CHUNK);

/** buf[start, end) is all zeros (compared in place: no slices allocated). */
export function isZeroRange(buf: Buffer, start: number, end: number): boolean {
  // Most blocks of file data start with a non-zero byte: they are told apart without a native call.
  if (start < end && buf[start] !== 0) return false;
  return ZERO.compare(buf, start, end, 0, end - start) === 0;
}

async function writeFully(fh: FileHandle, buf: Buffer, from: number, to: number, position: number) {
  while (from < to) {
    const { bytesWritten } = await fh.write(buf, from, to - from, position);
    if (bytesWritten === 0) throw new KilnError("STORE", "the output file accepts no more bytes");
    from += bytesWritten;
    position += bytesWritten;
  }
}

/** Writes buf[0..len) at `position`, skipping all-zero blocks (they stay holes of the file). */
export async function writeSparse(fh: FileHandle, buf: Buffer, len: number, position: number): Promise<void> {
  let run = -1;
  for (let i = 0; i < len; i += BLOCK) {
    const end = Math.min(i + BLOCK, len);
    if (isZeroRange(buf, i, end)) {
      if (run >= 0) await writeFully(fh, buf, run, i, position + run);
      run = -1;
    } else if (run < 0) {
      run = i;
    }
  }
  if (run >= 0) await writeFully(fh, buf, run, len, position + run);
}

export class DataStream {
  #stage = Buffer.alloc(CHUNK);
  #spare = Buffer.alloc(CHUNK);
  #fill = 0;
  #start: number;
  #pending: Promise<void> = Promise.resolve();
  #error: unknown;
  #unsynced = 0;
  #syncing: Promise<void> | undefined;

  constructor(
    private readonly fh: FileHandle,
    start: number,
  ) {
    this.#start = start;
  }

  /** Byte offset in the output of the next byte put. */
  get position(): number {
    return this.#start + this.#fill;
  }

  /** Zeros up to `position` (the padding of the previous file's last block); never backwards. */
  async seek(position: number): Promise<void> {
    if (position < this.position) {
      throw new KilnError("INTERNAL", `data stream: seek back from ${this.position} to ${position}`);
    }
    while (this.position < position) {
      const n = Math.min(position - this.position, CHUNK - this.#fill);
      this.#stage.fill(0, this.#fill, this.#fill + n);
      this.#fill += n;
      if (this.#fill === CHUNK) await this.#flush();
    }
  }

  /** Appends chunk[from, to). The chunk is copied: the caller may reuse it at once. */
  async put(chunk: Buffer, from = 0, to = chunk.length): Promise<void> {
    while (from < to) {
      const n = Math.min(to - from, CHUNK - this.#fill);
      chunk.copy(this.#stage, this.#fill, from, from + n);
      this.#fill += n;
      from += n;
      if (this.#fill === CHUNK) await this.#flush();
    }
  }

  /** Writes what is buffered and waits for every write. */
  async end(): Promise<void> {
    await this.#flush();
    await this.#pending;
    await this.#syncing;
    if (this.#error) throw this.#error;
  }

  /** Starts writing back what was written so far, unless a write-back is still running. */
  #writeBehind(written: number): void {
    this.#unsynced += written;
    if (this.#unsynced < WRITE_BEHIND || this.#syncing) return;
    this.#unsynced = 0;
    this.#syncing = this.fh
      .datasync()
      .catch((err: unknown) => {
        this.#error ??= err;
      })
      .finally(() => {
        this.#syncing = undefined;
      });
  }

  async #flush(): Promise<void> {
    await this.#pending;
    if (this.#error) throw this.#error;
    const [buf, len, pos] = [this.#stage, this.#fill, this.#start];
    // A handler now, so a failed write never surfaces as an unhandled rejection.
    this.#pending = writeSparse(this.fh, buf, len, pos).then(
      () => this.#writeBehind(len),
      (err: unknown) => {
        this.#error = err;
      },
    );
    [this.#stage, this.#spare] = [this.#spare, this.#stage];
    this.#start += len;
    this.#fill = 0;
  }
}
