/**
 * A tar stored as a plain file read by position: what the tar reader skips is never read. Reading
 * the headers of an uncompressed layer then costs a few reads per entry instead of a read of every
 * byte, and the writers' pass reads only the files that survive in the image.
 *
 * Reads go through a window: the bytes at the position and after it, read in one call, so the many
 * small reads of a tar (headers, small files, padding) cost few system calls. When the reader moves
 * past the window in order, the next window was already read (one read ahead). Windows are not
 * reused (a slice handed out stays valid for as long as its holder keeps it) unless `reuse` says
 * the reader's consumer copies what it keeps.
 */
import type { FileHandle } from "node:fs/promises";
import { KilnError } from "../errors.js";
import { ReadBuffer, readBuffer } from "../read-buffer.js";
import type { ByteSource } from "./reader.js";

export interface FileSourceOptions {
  /** Bytes read at once (default 1 MiB). Small for a header scan, large to read file data. */
  readonly window?: number | undefined;
  /**
   * Read the next window while the current one is used: always (default), or "sequential": only
   * once the reader came to a window's end in order (a header scan over small files; over big
   * files it jumps past the next window, which would be read for nothing).
   */
  readonly readAhead?: boolean | "sequential" | undefined;
  /**
   * Read windows into a ring of three buffers instead of new ones: a slice is then valid only until
   * the consumer asks for more. For a consumer that copies each chunk first: one fresh 1 MiB buffer
   * per MiB read is garbage V8 frees only once tens of MiB of it pile up (peak memory).
   */
  readonly reuse?: boolean | undefined;
  /** Told every move forward (read or skipped bytes), for progress. */
  readonly onAdvance?: ((n: number) => void) | undefined;
  /** The error for a file that ends inside something (`what`). */
  readonly truncated?: ((what: string) => KilnError) | undefined;
}

export class FileByteSource implements ByteSource {
  readonly #fh: FileHandle;
  readonly #size: number;
  readonly #windowSize: number;
  readonly #truncated: (what: string) => KilnError;
  readonly #readAhead: boolean | "sequential";
  readonly #onAdvance: ((n: number) => void) | undefined;
  readonly #reuse: boolean;
  /** Reuse: the current window, the one read ahead, and one more of slack, taken in turn. */
  readonly #ring: ReadBuffer[] = [];
  #ringNext = 0;
  #window: Buffer = Buffer.alloc(0);
  #windowStart = 0;
  /** The window after the current one, being read. */
  #ahead: { start: number; end: number; read: Promise<Buffer> } | undefined;
  #generation = 0;
  #position = 0;

  get position(): number {
    return this.#position;
  }

  #move(to: number): void {
    const n = to - this.#position;
    this.#position = to;
    if (n > 0) this.#onAdvance?.(n);
  }

  /** `fh` stays the caller's: close() does not close it. `size` is the file's size. */
  constructor(fh: FileHandle, size: number, opts: FileSourceOptions = {}) {
    this.#fh = fh;
    this.#size = size;
    this.#windowSize = opts.window ?? 1 << 20;
    this.#readAhead = opts.readAhead ?? true;
    this.#onAdvance = opts.onAdvance;
    this.#reuse = opts.reuse ?? false;
    this.#truncated =
      opts.truncated ?? ((what) => new KilnError("INVALID_ARCHIVE", `truncated archive: ${what}`));
  }

  #readAt(start: number, length: number): Promise<Buffer> {
    const p = (async () => {
      const buf =
        this.#reuse && length <= this.#windowSize
          ? this.#ringBuffer(start, length)
          : readBuffer(start, length);
      let got = 0;
      while (got < length) {
        const { bytesRead } = await this.#fh.read(buf, got, length - got, start + got);
        if (bytesRead === 0)
          throw this.#truncated(`the file shrank while it was read (offset ${start + got})`);
        got += bytesRead;
      }
      return buf;
    })();
    // Read-ahead that nobody awaits must not count as an unhandled rejection.
    p.catch(() => {});
    return p;
  }

  #ringBuffer(start: number, length: number): Buffer {
    const i = this.#ringNext;
    this.#ringNext = (i + 1) % 3;
    this.#ring[i] ??= new ReadBuffer(this.#windowSize);
    return this.#ring[i].view(start, length);
  }

  /** Bytes of the window from the position on (0 when the position is outside it). */
  #available(): number {
    const end = this.#windowStart + this.#window.length;
    return this.position >= this.#windowStart && this.position < end ? end - this.position : 0;
  }

  /** Makes the window hold [position, position + n) (n ≤ what is left of the file). */
  async #fill(n: number): Promise<void> {
    if (this.#available() >= n) return;
    const start = this.position;
    const ahead = this.#ahead;
    this.#ahead = undefined;
    const inOrder = start === this.#windowStart + this.#window.length;
    if (ahead && ahead.start <= start && start + n <= ahead.end) {
      this.#window = await ahead.read;
      this.#windowStart = ahead.start;
    } else {
      // A read ahead not used still fills its ring buffer: let it finish before the ring comes round.
      if (ahead && this.#reuse) await ahead.read.catch(() => {});
      this.#window = await this.#readAt(start, Math.min(Math.max(n, this.#windowSize), this.#size - start));
      this.#windowStart = start;
    }
    const next = this.#windowStart + this.#window.length;
    const readAhead = this.#readAhead === "sequential" ? inOrder : this.#readAhead;
    if (readAhead && next < this.#size) {
      const end = Math.min(next + this.#windowSize, this.#size);
      this.#ahead = { start: next, end, read: this.#readAt(next, end - next) };
    }
  }

  #slice(n: number): Buffer {
    const from = this.position - this.#windowStart;
    this.#move(this.position + n);
    return this.#window.subarray(from, from + n);
  }

  async read(n: number, what: string): Promise<Buffer | null> {
    this.#generation++;
    if (this.position >= this.#size) return null;
    if (this.position + n > this.#size) throw this.#truncated(what);
    await this.#fill(n);
    return this.#slice(n);
  }

  async readExact(n: number, what: string): Promise<Buffer> {
    if (n === 0) return Buffer.alloc(0);
    const b = await this.read(n, what);
    if (b === null) throw this.#truncated(what);
    return b;
  }

  async *take(n: number, what: string): AsyncGenerator<Buffer> {
    const generation = ++this.#generation;
    if (this.position + n > this.#size) throw this.#truncated(what);
    let left = n;
    while (left > 0) {
      if (generation !== this.#generation) {
        throw new KilnError("INTERNAL", `${what}: read after the reader moved on`);
      }
      // Slices end at the window's end, so the next slice comes from the window read ahead.
      if (this.#available() === 0) await this.#fill(Math.min(left, this.#windowSize));
      const part = Math.min(left, this.#available());
      left -= part;
      yield this.#slice(part);
    }
  }

  async skip(n: number, what: string): Promise<void> {
    this.#generation++;
    if (this.position + n > this.#size) throw this.#truncated(what);
    this.#move(this.position + n);
  }

  async skipToEnd(n: number): Promise<boolean> {
    this.#generation++;
    if (this.position + n > this.#size) {
      this.#move(this.#size);
      return false;
    }
    this.#move(this.position + n);
    return true;
  }

  async drain(): Promise<void> {
    this.#generation++;
    this.#move(this.#size);
  }

  async close(): Promise<void> {
    this.#ahead = undefined;
    this.#window = Buffer.alloc(0);
  }
}
