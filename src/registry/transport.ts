/**
 * HTTP for the registry client: undici agents with the right CAs, manual redirects that never carry
 * credentials to another origin, classification of network failures into KilnErrors, and retries
 * with exponential backoff and jitter.
 */
import { readFileSync } from "node:fs";
import { type ConnectionOptions, createSecureContext, rootCertificates } from "node:tls";
import { KilnError } from "../errors.js";
import { Agent, type Dispatcher } from "./undici.js";

export interface Timeouts {
  /** TCP + TLS connect (default 30 s). */
  connectMs?: number | undefined;
  /** From sending a request to the end of the response headers (default 30 s). */
  headersMs?: number | undefined;
  /** Longest silence while a body streams (default 60 s). */
  bodyIdleMs?: number | undefined;
}

export interface RetryPolicy {
  /** Tries in all for one request, the first included (default 5; 1 = no retry). */
  attempts?: number | undefined;
  /** First backoff delay; doubled each retry, with jitter (default 250 ms). */
  baseDelayMs?: number | undefined;
  /** Cap on any single wait, Retry-After included (default 10 s). */
  maxDelayMs?: number | undefined;
  /** Reconnections of a blob download in a row without new bytes (default 5). */
  resumeAttempts?: number | undefined;
}

export interface TransportOptions {
  /** PEM file of extra CA certificates, trusted on top of the system ones. */
  caFile?: string | undefined;
  /** NODE_EXTRA_CA_CERTS (or bin/kiln's KILN_DEFERRED_CA_CERTS) is read from here (default process.env). */
  env?: NodeJS.ProcessEnv | undefined;
  timeouts?: Timeouts | undefined;
  retries?: RetryPolicy | undefined;
  userAgent?: string | undefined;
}

export type Headers = Record<string, string>;

export interface SendOptions {
  method?: "GET" | "HEAD" | "POST" | undefined;
  headers?: Headers | undefined;
  body?: string | undefined;
  signal?: AbortSignal | undefined;
  /** Skip TLS verification for this URL's host (an insecure registry); never for redirect targets elsewhere. */
  insecure?: boolean | undefined;
}

export interface Response {
  /** The URL that answered, after redirects. */
  readonly url: URL;
  readonly status: number;
  readonly headers: Record<string, string | string[] | undefined>;
  readonly body: Dispatcher.ResponseData["body"];
}

const REDIRECTS = new Set([301, 302, 303, 307, 308]);
const MAX_REDIRECTS = 10;
const RETRYABLE_CODES = new Set([
  "ECONNRESET",
  "ETIMEDOUT",
  "EPIPE",
  "ECONNABORTED",
  "EAI_AGAIN",
  "UND_ERR_SOCKET",
  "UND_ERR_CLOSED",
  "UND_ERR_CONNECT_TIMEOUT",
  "UND_ERR_HEADERS_TIMEOUT",
  "UND_ERR_BODY_TIMEOUT",
  "UND_ERR_RES_CONTENT_LENGTH_MISMATCH",
]);
const TIMEOUT_CODES = new Set([
  "ETIMEDOUT",
  "UND_ERR_CONNECT_TIMEOUT",
  "UND_ERR_HEADERS_TIMEOUT",
  "UND_ERR_BODY_TIMEOUT",
]);
const TLS_CODE =
  /^(ERR_TLS_|ERR_SSL_|CERT_|UNABLE_TO_|DEPTH_ZERO_SELF_SIGNED_CERT$|SELF_SIGNED_CERT_IN_CHAIN$|HOSTNAME_MISMATCH$|EPROTO$)/;

/** A response status worth trying again: the server is busy or failed, not the request. */
export function isRetryableStatus(status: number): boolean {
  return status >= 500 || status === 429 || status === 408;
}

/** Raised inside a retry loop to ask for another try after `delayMs` (or the backoff). */
export class RetryLater extends Error {
  constructor(
    readonly delayMs: number | undefined,
    readonly last: KilnError,
  ) {
    super(last.message);
  }
}

/** Whether a KilnError came from a failed connection or stream that another try may fix. */
export function isRetryable(err: unknown): boolean {
  return err instanceof RetryLater || (err instanceof KilnError && err.details?.retryable === true);
}

/** Whether a KilnError means the connection itself failed (refused, TLS, reset, timeout). */
export function isConnectionError(err: unknown): boolean {
  return err instanceof KilnError && err.details?.connection === true;
}

/** Whether a KilnError is a TLS certificate that failed verification (so the server does speak TLS). */
export function isCertificateError(err: unknown): boolean {
  return err instanceof KilnError && err.details?.certificate === true;
}

/** `Retry-After` as milliseconds: delta-seconds or an HTTP date. */
export function parseRetryAfter(value: string | string[] | undefined, now: number): number | undefined {
  const v = Array.isArray(value) ? value[0] : value;
  if (v === undefined || v.trim() === "") return undefined;
  if (/^\d+$/.test(v.trim())) return Number(v.trim()) * 1000;
  const at = Date.parse(v);
  return Number.isNaN(at) ? undefined : Math.max(0, at - now);
}

/** Turns whatever undici or the socket threw into one clear KilnError naming the host. */
export function networkError(err: unknown, url: URL, timeouts: Required<Timeouts>): KilnError {
  if (err instanceof KilnError) return err;
  const e = err as NodeJS.ErrnoException & { cause?: NodeJS.ErrnoException };
  const code = typeof e?.code === "string" ? e.code : typeof e?.cause?.code === "string" ? e.cause.code : "";
  const host = url.host;
  const reason = e instanceof Error ? e.message.split("\n")[0]!.trim() : String(err);
  const details = { host, errno: code, connection: true, retryable: RETRYABLE_CODES.has(code) };
  if (code === "ERR_SSL_WRONG_VERSION_NUMBER" || code === "EPROTO") {
    return new KilnError(
      "TLS",
      `TLS connection to ${host} failed: the server does not speak TLS (plain HTTP?); list it in the insecure registries to allow plain HTTP`,
      { cause: err, details },
    );
  }
  if (TLS_CODE.test(code)) {
    return new KilnError(
      "TLS",
      `TLS connection to ${host} failed: ${reason} (${code}); trust its CA with --ca-file, or list it in the insecure registries`,
      { cause: err, details: { ...details, certificate: true } },
    );
  }
  if (TIMEOUT_CODES.has(code)) {
    const which =
      code === "UND_ERR_CONNECT_TIMEOUT"
        ? `no connection within ${timeouts.connectMs} ms`
        : code === "UND_ERR_HEADERS_TIMEOUT"
          ? `no response within ${timeouts.headersMs} ms`
          : code === "UND_ERR_BODY_TIMEOUT"
            ? `no data for ${timeouts.bodyIdleMs} ms`
            : reason;
    return new KilnError("TIMEOUT", `${host} timed out: ${which}`, { cause: err, details });
  }
  return new KilnError(
    "NETWORK",
    `cannot reach ${host}: ${reason}${code && !reason.includes(code) ? ` (${code})` : ""}`,
    {
      cause: err,
      details,
    },
  );
}

/** `setTimeout` that an abort ends early, rejecting with the signal's reason. */
export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  if (signal?.aborted) return Promise.reject(signal.reason);
  return new Promise((resolve, reject) => {
    const onAbort = () => {
      clearTimeout(timer);
      reject(signal!.reason);
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}

/** The bundle Node itself loaded while starting, which its default TLS context trusts. */
const STARTUP_EXTRA_CA_CERTS = process.env.NODE_EXTRA_CA_CERTS;

/**
 * The system CAs plus caFile and the extra bundles the environment names, or undefined when Node's
 * default will do. bin/kiln hands NODE_EXTRA_CA_CERTS on as KILN_DEFERRED_CA_CERTS, so that Node
 * does not parse it at start: commands that verify no TLS peer never pay for parsing it.
 */
function trustedCAs(caFile: string | undefined, env: NodeJS.ProcessEnv): string[] | undefined {
  const extra: string[] = [];
  if (caFile) {
    let pem: string;
    try {
      pem = readFileSync(caFile, "utf8");
    } catch (err) {
      throw new KilnError("INVALID_ARGUMENT", `cannot read CA file ${caFile}: ${(err as Error).message}`, {
        cause: err,
      });
    }
    if (!pem.includes("-----BEGIN CERTIFICATE-----")) {
      throw new KilnError("INVALID_ARGUMENT", `CA file ${caFile} holds no PEM certificate`);
    }
    extra.push(pem);
  }
  const bundles = [env.NODE_EXTRA_CA_CERTS, env.KILN_DEFERRED_CA_CERTS].filter((f): f is string => !!f);
  // Node's default context already trusts the bundle it loaded at start; building our own store
  // from PEM text costs ~50 ms, so only do it when something is missing from that context.
  if (extra.length === 0 && bundles.every((f) => f === STARTUP_EXTRA_CA_CERTS)) return undefined;
  for (const file of new Set(bundles)) {
    try {
      extra.push(readFileSync(file, "utf8"));
    } catch {
      // Node itself only warns about an unreadable NODE_EXTRA_CA_CERTS; so do we, by ignoring it.
    }
  }
  return extra.length ? [...rootCertificates, ...extra] : undefined;
}

export class Transport {
  readonly timeouts: Required<Timeouts>;
  readonly retries: Required<RetryPolicy>;
  readonly userAgent: string;
  private readonly ca: string[] | undefined;
  private secureAgent: Agent | undefined;
  private insecureAgent: Agent | undefined;

  constructor(opts: TransportOptions = {}) {
    this.timeouts = {
      connectMs: opts.timeouts?.connectMs ?? 30_000,
      headersMs: opts.timeouts?.headersMs ?? 30_000,
      bodyIdleMs: opts.timeouts?.bodyIdleMs ?? 60_000,
    };
    this.retries = {
      attempts: Math.max(1, opts.retries?.attempts ?? 5),
      baseDelayMs: opts.retries?.baseDelayMs ?? 250,
      maxDelayMs: opts.retries?.maxDelayMs ?? 10_000,
      resumeAttempts: opts.retries?.resumeAttempts ?? 5,
    };
    this.userAgent = opts.userAgent ?? "kiln/0.1.0";
    this.ca = trustedCAs(opts.caFile, opts.env ?? process.env);
  }

  /** The CA part of the TLS options. */
  private trust(verify: boolean): ConnectionOptions {
    // Nothing verified, no store needed: an empty one spares the ~40 ms Node spends parsing its
    // root certificates for its first context (the HTTPS probe of an insecure registry).
    if (!verify) return { ca: [] };
    // One context per agent: given a `ca` list, tls.connect would parse it again for each connection.
    return this.ca ? { secureContext: createSecureContext({ ca: this.ca }) } : {};
  }

  private agent(insecure: boolean): Agent {
    const make = (rejectUnauthorized: boolean) =>
      new Agent({
        connect: {
          timeout: this.timeouts.connectMs,
          rejectUnauthorized,
          ...this.trust(rejectUnauthorized),
        },
        headersTimeout: this.timeouts.headersMs,
        bodyTimeout: this.timeouts.bodyIdleMs,
      });
    if (insecure) {
      this.insecureAgent ??= make(false);
      return this.insecureAgent;
    }
    this.secureAgent ??= make(true);
    return this.secureAgent;
  }

  /**
   * One try of a request, following redirects by hand: Authorization goes only to the origin first
   * asked (blob storage gets signed URLs, not registry tokens). Network failures throw KilnErrors
   * with `details.retryable`; every HTTP status is returned, the body left to the caller.
   */
  async send(url: URL, opts: SendOptions = {}): Promise<Response> {
    const origin = url.origin;
    let current = url;
    let method = opts.method ?? "GET";
    let body = opts.body;
    const headers: Headers = { "user-agent": this.userAgent, ...opts.headers };
    for (let hop = 0; ; hop++) {
      let res: Dispatcher.ResponseData;
      try {
        res = await this.agent(opts.insecure === true && current.origin === origin).request({
          origin: current.origin,
          path: `${current.pathname}${current.search}`,
          method,
          headers,
          body,
          signal: opts.signal,
        });
      } catch (err) {
        if (opts.signal?.aborted) throw opts.signal.reason;
        throw networkError(err, current, this.timeouts);
      }
      const location = res.headers.location;
      if (!REDIRECTS.has(res.statusCode) || typeof location !== "string") {
        return { url: current, status: res.statusCode, headers: res.headers, body: res.body };
      }
      await res.body.dump().catch(() => {});
      if (hop >= MAX_REDIRECTS) {
        throw new KilnError(
          "REGISTRY_ERROR",
          `too many redirects from ${url.host} (last to ${current.host})`,
        );
      }
      const next = new URL(location, current);
      if (next.origin !== origin) delete headers.authorization;
      if (res.statusCode === 303 && method === "POST") {
        method = "GET";
        body = undefined;
        delete headers["content-type"];
      }
      current = next;
    }
  }

  /** The wait before retry number `retry` (1-based): exponential, capped, with jitter. */
  backoff(retry: number): number {
    const exp = Math.min(this.retries.maxDelayMs, this.retries.baseDelayMs * 2 ** (retry - 1));
    return Math.round(exp / 2 + (Math.random() * exp) / 2);
  }

  /** How long a busy answer asks us to wait, capped. */
  retryDelay(res: Response): number | undefined {
    const after = parseRetryAfter(res.headers["retry-after"], Date.now());
    return after === undefined ? undefined : Math.min(after, this.retries.maxDelayMs);
  }

  /**
   * Runs `attempt` until it succeeds, fails for good, or the tries are spent. `last` tells the
   * attempt not to throw RetryLater but to report the failure itself.
   */
  async retry<T>(signal: AbortSignal | undefined, attempt: (last: boolean) => Promise<T>): Promise<T> {
    for (let n = 1; ; n++) {
      const last = n >= this.retries.attempts;
      try {
        return await attempt(last);
      } catch (err) {
        if (signal?.aborted) throw signal.reason;
        if (last || !isRetryable(err)) throw err instanceof RetryLater ? err.last : err;
        const delay = err instanceof RetryLater && err.delayMs !== undefined ? err.delayMs : this.backoff(n);
        await sleep(delay, signal);
      }
    }
  }

  async close(): Promise<void> {
    await Promise.all([this.secureAgent?.close(), this.insecureAgent?.close()]);
    this.secureAgent = undefined;
    this.insecureAgent = undefined;
  }
}
