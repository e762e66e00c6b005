/**
 * Write-back of a file while it is still being written. Everything kiln writes for keeps (blobs,
 * images) is fsynced once complete; the kernel alone starts writing dirty pages back only past a
 * tenth of the memory, so on a large machine the disk would sit idle while a file is written, then
 * take all of it at the fsync, on the critical path. Every `every` bytes this starts an fdatasync
 * (one at a time, not awaited), so the disk works beside the download or the writer.
 */
export class WriteBehind {
  readonly #sync: () => Promise<void>;
  readonly #every: number;
  #unsynced = 0;
  #syncing: Promise<void> | undefined;
  #error: unknown;

  /** `sync` writes back what was written so far (a FileHandle's datasync). */
  constructor(sync: () => Promise<void>, every = 32 << 20) {
    this.#sync = sync;
    this.#every = every;
  }

  /** The first write-back that failed, if any (the file's final sync would fail the same way). */
  get error(): unknown {
    return this.#error;
  }

  /** `n` more bytes were handed to the file: starts a write-back once enough are waiting. */
  wrote(n: number): void {
    this.#unsynced += n;
    if (this.#unsynced < this.#every || this.#syncing) return;
    this.#unsynced = 0;
    this.#syncing = this.#sync()
      .catch((err: unknown) => {
        this.#error ??= err;
      })
      .finally(() => {
        this.#syncing = undefined;
      });
  }

  /** Waits for the write-back under way (before the file is closed); throws the first failure. */
  async settle(): Promise<void> {
    await this.#syncing;
    if (this.#error !== undefined) throw this.#error;
  }
}
