/**
 * A blob download that survives cut connections: it reopens at the byte it reached (`Range`), drops
 * what a server that ignores ranges sends again, and never yields more than the declared size.
 */
import { Readable } from "node:stream";
import { KilnError } from "../errors.js";
import { discard } from "./response.js";
import { isRetryable, sleep } from "./transport.js";

/** An open response body positioned so that, after `skip` bytes, it continues at the asked offset. */
export interface BlobBody {
  readonly body: Readable;
  readonly skip: number;
  /** Maps the body's stream errors to KilnErrors (with `details.retryable`). */
  readonly classify: (err: unknown) => KilnError;
}

/** Opens the blob again from `offset`. */
export type BlobOpener = (offset: number, signal: AbortSignal) => Promise<BlobBody>;

export interface ResumableOptions {
  readonly size: number;
  /** For messages: `blob sha256:… of 127.0.0.1:5000/app`. */
  readonly what: string;
  readonly onBytes?: ((n: number) => void) | undefined;
  readonly signal?: AbortSignal | undefined;
  /** Reconnections in a row without a new byte before giving up. */
  readonly resumeAttempts: number;
  /** The wait before reconnection number n (1-based). */
  readonly backoff: (n: number) => number;
}

export class ResumableBlobStream extends Readable {
  private received = 0;
  private failures = 0;
  private body: Readable | undefined;
  private skip = 0;
  private classify: (err: unknown) => KilnError;
  private readonly internal = new AbortController();
  private readonly signal: AbortSignal;
  private readonly onAbort = () => this.destroy(this.opts.signal?.reason);

  constructor(
    first: BlobBody,
    private readonly open: BlobOpener,
    private readonly opts: ResumableOptions,
  ) {
    super({ highWaterMark: 64 * 1024 });
    this.signal = opts.signal ? AbortSignal.any([opts.signal, this.internal.signal]) : this.internal.signal;
    opts.signal?.addEventListener("abort", this.onAbort, { once: true });
    this.classify = first.classify;
    this.attach(first);
  }

  /** Bytes of the blob delivered so far. */
  get position(): number {
    return this.received;
  }

  private attach(b: BlobBody): void {
    const body = b.body;
    this.body = body;
    this.skip = b.skip;
    this.classify = b.classify;
    body.on("data", (chunk: Buffer) => {
      if (this.body === body) this.onData(chunk);
    });
    body.once("end", () => {
      if (this.body !== body) return;
      this.body = undefined;
      if (this.received === this.opts.size) this.push(null);
      else this.onBreak(undefined);
    });
    // `on`, not `once`: undici reports destroying an unread body as one more error.
    body.on("error", (err) => {
      if (this.body === body) this.onBreak(err);
    });
  }

  private onData(chunk: Buffer): void {
    this.opts.onBytes?.(chunk.length);
    let data = chunk;
    if (this.skip > 0) {
      if (data.length <= this.skip) {
        this.skip -= data.length;
        return;
      }
      data = data.subarray(this.skip);
      this.skip = 0;
    }
    if (this.received + data.length > this.opts.size) {
      this.destroy(
        new KilnError(
          "SIZE_MISMATCH",
          `${this.opts.what}: the registry sent more than the ${this.opts.size} bytes the descriptor declares`,
        ),
      );
      return;
    }
    this.received += data.length;
    this.failures = 0;
    if (!this.push(data)) this.body?.pause();
  }

  /** The body broke (or ended short): reopen where we are, a bounded number of times. */
  private onBreak(err: unknown): void {
    const body = this.body;
    this.body = undefined;
    body?.destroy();
    if (this.destroyed || this.signal.aborted) return;
    const { size, what } = this.opts;
    const cause =
      err === undefined
        ? new KilnError("NETWORK", `${what}: the connection ended after ${this.received} of ${size} bytes`, {
            details: { retryable: true },
          })
        : this.classify(err);
    if (!isRetryable(cause)) {
      this.destroy(cause);
      return;
    }
    this.failures++;
    if (this.failures > this.opts.resumeAttempts) {
      this.destroy(
        new KilnError(
          cause.code,
          `${what}: download broke off at byte ${this.received} of ${size}, ${this.opts.resumeAttempts} resumes failed: ${cause.message}`,
          { cause },
        ),
      );
      return;
    }
    sleep(this.opts.backoff(this.failures), this.signal)
      .then(() => this.open(this.received, this.signal))
      .then(
        (next) => {
          if (this.destroyed) discard(next.body);
          else this.attach(next);
        },
        (e) => {
          if (!this.destroyed) this.destroy(this.opts.signal?.aborted ? this.opts.signal.reason : e);
        },
      );
  }

  override _read(): void {
    this.body?.resume();
  }

  override _destroy(err: Error | null, cb: (err?: Error | null) => void): void {
    this.opts.signal?.removeEventListener("abort", this.onAbort);
    this.internal.abort();
    this.body?.destroy();
    this.body = undefined;
    cb(err);
  }
}
