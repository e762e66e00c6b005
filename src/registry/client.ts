/**
 * A Docker distribution (OCI) registry client for pulling: ping, manifests, blobs. Every manifest is
 * checked against its digest; blobs stream with resumption and are checked by whoever stores them
 * (getBlob checks small ones itself).
 */
import { createHash } from "node:crypto";
import type { Readable } from "node:stream";
import { KilnError } from "../errors.js";
import { isDigest, parseDigest } from "../reference/digest.js";
import {
  Authenticator,
  type Authorization,
  type AuthTarget,
  type Challenge,
  parseChallenges,
} from "./auth.js";
import { type BlobBody, ResumableBlobStream } from "./blob-stream.js";
import type { CredentialProvider } from "./credentials.js";
import {
  type EndpointCandidate,
  type EndpointPolicy,
  endpointCandidates,
  validateMirrors,
} from "./endpoints.js";
import { type Descriptor, isNonDistributable, MANIFEST_ACCEPT } from "./manifest.js";
import { discard, errorMessage, header, readCapped, type StatusContext, statusError } from "./response.js";
import {
  isCertificateError,
  isConnectionError,
  isRetryableStatus,
  networkError,
  type Response,
  RetryLater,
  type RetryPolicy,
  type Timeouts,
  Transport,
} from "./transport.js";

export const DEFAULT_MAX_MANIFEST_BYTES = 4 * 1024 * 1024;

export interface RegistryOptions {
  /** `host` or `host:port` that may be reached over plain HTTP (and whose TLS is not verified). */
  insecureRegistries?: string[] | undefined;
  /** PEM file of extra CA certificates. */
  caFile?: string | undefined;
  /** Mirror URLs for docker.io, tried in order before docker.io itself. */
  registryMirrors?: string[] | undefined;
  credentials?: CredentialProvider | undefined;
  userAgent?: string | undefined;
  timeouts?: Timeouts | undefined;
  retries?: RetryPolicy | undefined;
  /** For NODE_EXTRA_CA_CERTS (default process.env). */
  env?: NodeJS.ProcessEnv | undefined;
  /** Largest manifest accepted (default 4 MiB). */
  maxManifestBytes?: number | undefined;
  /** The clock for token expiry (default Date.now); for tests. */
  now?: (() => number) | undefined;
}

/** A repository in a registry; an ImageRef is one. */
export interface RepositoryRef {
  readonly registry: string;
  readonly repository: string;
}

export interface RequestOptions {
  signal?: AbortSignal | undefined;
}

export interface BlobOptions extends RequestOptions {
  /** Called with the count of bytes received as they arrive (re-sent ones after a resume included). */
  onBytes?: ((n: number) => void) | undefined;
}

export interface Manifest {
  /** The digest the bytes were verified against. */
  readonly digest: string;
  /** Content-Type as the registry gave it (parameters dropped), else the document's own mediaType, else "". */
  readonly mediaType: string;
  readonly bytes: Buffer;
}

export interface ManifestHead {
  readonly digest: string;
  readonly mediaType: string;
  readonly size: number;
}

interface Endpoint extends AuthTarget {
  /** `https://host:port`, or a mirror's URL (which may have a path). */
  readonly base: string;
}

interface Authorized {
  readonly res: Response;
  readonly auth: Authorization;
}

const GENERIC_TYPES = new Set(["", "application/json", "text/plain", "application/octet-stream"]);

function digestOf(bytes: Buffer, algorithm: string): string {
  return `${algorithm}:${createHash(algorithm).update(bytes).digest("hex")}`;
}

function shownRef(ref: RepositoryRef, reference: string): string {
  return `${ref.registry}/${ref.repository}${isDigest(reference) ? "@" : ":"}${reference}`;
}

function contentType(res: Response): string {
  return (header(res, "content-type") ?? "").split(";")[0]!.trim().toLowerCase();
}

/** Checks manifest bytes against the digest asked for and the one the registry claims. */
function verifyManifest(
  bytes: Buffer,
  reference: string,
  claimed: string | undefined,
  shown: string,
): string {
  if (isDigest(reference)) {
    const want = parseDigest(reference);
    const actual = digestOf(bytes, want.algorithm);
    if (actual !== want.value) {
      throw new KilnError(
        "DIGEST_MISMATCH",
        `manifest ${shown}: the registry sent bytes with digest ${actual}`,
        {
          details: { expected: want.value, actual },
        },
      );
    }
  }
  if (claimed) {
    let d: ReturnType<typeof parseDigest>;
    try {
      d = parseDigest(claimed.trim());
    } catch {
      throw new KilnError("REGISTRY_ERROR", `manifest ${shown}: invalid Docker-Content-Digest "${claimed}"`);
    }
    const actual = digestOf(bytes, d.algorithm);
    if (actual !== d.value) {
      throw new KilnError(
        "DIGEST_MISMATCH",
        `manifest ${shown}: Docker-Content-Digest says ${d.value} but the bytes have digest ${actual}`,
        { details: { expected: d.value, actual } },
      );
    }
  }
  return isDigest(reference) ? reference : digestOf(bytes, "sha256");
}

export class RegistryClient {
  private readonly transport: Transport;
  private readonly auth: Authenticator;
  private readonly policy: EndpointPolicy;
  private readonly maxManifestBytes: number;
  private readonly endpoints = new Map<string, Promise<Endpoint>>();

  constructor(opts: RegistryOptions = {}) {
    this.transport = new Transport(opts);
    this.auth = new Authenticator(this.transport, opts.credentials, opts.now ?? Date.now);
    this.policy = {
      insecureRegistries: opts.insecureRegistries ?? [],
      registryMirrors: opts.registryMirrors ?? [],
    };
    validateMirrors(this.policy.registryMirrors);
    this.maxManifestBytes = opts.maxManifestBytes ?? DEFAULT_MAX_MANIFEST_BYTES;
  }

  /** Checks that the registry answers the v2 API (a fresh `/v2/` probe; 200 or 401 both count). */
  async ping(registry: string, opts: RequestOptions = {}): Promise<void> {
    for (const c of endpointCandidates(registry, this.policy)) this.endpoints.delete(c.bases.join(" "));
    await this.withEndpoint(registry, opts.signal, async () => {});
  }

  /** GETs a manifest or index by tag or digest, verified against the digest. */
  async getManifest(ref: RepositoryRef, reference: string, opts: RequestOptions = {}): Promise<Manifest> {
    const shown = shownRef(ref, reference);
    const ctx: StatusContext = {
      subject: `manifest ${shown}`,
      notFound: `manifest unknown: ${shown}`,
      repository: `${ref.registry}/${ref.repository}`,
    };
    return this.withEndpoint(ref.registry, opts.signal, (ep) =>
      this.call(
        ep,
        ref.repository,
        `/v2/${ref.repository}/manifests/${reference}`,
        { method: "GET", headers: { accept: MANIFEST_ACCEPT.join(", ") }, signal: opts.signal },
        async ({ res, auth }) => {
          if (res.status !== 200) throw await this.failure(ep, res, auth, ctx);
          const bytes = await readCapped(res, this.maxManifestBytes, `manifest ${shown}`, this.transport);
          const digest = verifyManifest(bytes, reference, header(res, "docker-content-digest"), shown);
          let mediaType = contentType(res);
          if (GENERIC_TYPES.has(mediaType)) {
            try {
              const doc = JSON.parse(bytes.toString("utf8"));
              mediaType = typeof doc?.mediaType === "string" ? doc.mediaType : "";
            } catch {
              mediaType = ""; // parseManifest reports the bad JSON
            }
          }
          return { digest, mediaType, bytes };
        },
      ),
    );
  }

  /** HEADs a manifest: its digest, type and size without the body (falls back to GET without a digest header). */
  async headManifest(
    ref: RepositoryRef,
    reference: string,
    opts: RequestOptions = {},
  ): Promise<ManifestHead> {
    const shown = shownRef(ref, reference);
    const ctx: StatusContext = {
      subject: `manifest ${shown}`,
      notFound: `manifest unknown: ${shown}`,
      repository: `${ref.registry}/${ref.repository}`,
    };
    const head = await this.withEndpoint(ref.registry, opts.signal, (ep) =>
      this.call(
        ep,
        ref.repository,
        `/v2/${ref.repository}/manifests/${reference}`,
        { method: "HEAD", headers: { accept: MANIFEST_ACCEPT.join(", ") }, signal: opts.signal },
        async ({ res, auth }) => {
          if (res.status !== 200) throw await this.failure(ep, res, auth, ctx);
          await res.body.dump().catch(() => {});
          return {
            claimed: header(res, "docker-content-digest")?.trim(),
            mediaType: contentType(res),
            size: Number(header(res, "content-length")),
          };
        },
      ),
    );
    if (head.claimed && isDigest(head.claimed) && Number.isSafeInteger(head.size)) {
      if (isDigest(reference) && parseDigest(reference).algorithm === parseDigest(head.claimed).algorithm) {
        if (head.claimed !== reference) {
          throw new KilnError("DIGEST_MISMATCH", `manifest ${shown}: the registry names it ${head.claimed}`, {
            details: { expected: reference, actual: head.claimed },
          });
        }
      }
      return {
        digest: isDigest(reference) ? reference : head.claimed,
        mediaType: head.mediaType,
        size: head.size,
      };
    }
    const m = await this.getManifest(ref, reference, opts);
    return { digest: m.digest, mediaType: m.mediaType, size: m.bytes.length };
  }

  /** Fetches a small blob (an image config) whole, checking its size and digest. */
  async getBlob(
    ref: RepositoryRef,
    desc: Descriptor,
    maxBytes: number,
    opts: BlobOptions = {},
  ): Promise<Buffer> {
    const what = `blob ${desc.digest} of ${ref.registry}/${ref.repository}`;
    if (desc.size > maxBytes) {
      throw new KilnError("TOO_LARGE", `${what} is ${desc.size} bytes, over the ${maxBytes}-byte limit`);
    }
    const stream = await this.openBlob(ref, desc, opts);
    const chunks: Buffer[] = [];
    for await (const chunk of stream) chunks.push(chunk as Buffer);
    const bytes = Buffer.concat(chunks);
    if (bytes.length !== desc.size) {
      throw new KilnError(
        "SIZE_MISMATCH",
        `${what}: got ${bytes.length} bytes, the descriptor says ${desc.size}`,
      );
    }
    const want = parseDigest(desc.digest);
    const actual = digestOf(bytes, want.algorithm);
    if (actual !== want.value) {
      throw new KilnError("DIGEST_MISMATCH", `${what}: the registry sent bytes with digest ${actual}`, {
        details: { expected: want.value, actual },
      });
    }
    return bytes;
  }

  /**
   * Streams a blob: exactly `desc.size` bytes, resuming with `Range` when the connection breaks.
   * Non-distributable layers are tried at their `urls` first (without credentials). The digest is
   * for the consumer to check.
   */
  async openBlob(ref: RepositoryRef, desc: Descriptor, opts: BlobOptions = {}): Promise<Readable> {
    parseDigest(desc.digest);
    const what = `blob ${desc.digest} of ${ref.registry}/${ref.repository}`;
    const open = (offset: number, signal: AbortSignal | undefined) =>
      this.openBlobAt(ref, desc, offset, what, signal);
    const first = await open(0, opts.signal);
    return new ResumableBlobStream(first, open, {
      size: desc.size,
      what,
      onBytes: opts.onBytes,
      signal: opts.signal,
      resumeAttempts: this.transport.retries.resumeAttempts,
      backoff: (n) => this.transport.backoff(n),
    });
  }

  async close(): Promise<void> {
    await this.transport.close();
  }

  private async openBlobAt(
    ref: RepositoryRef,
    desc: Descriptor,
    offset: number,
    what: string,
    signal: AbortSignal | undefined,
  ): Promise<BlobBody> {
    const headers: Record<string, string> = offset > 0 ? { range: `bytes=${offset}-` } : {};
    let urlFailure: KilnError | undefined;
    if (desc.urls?.length && isNonDistributable(desc.mediaType)) {
      for (const raw of desc.urls) {
        let url: URL;
        try {
          url = new URL(raw);
        } catch {
          continue;
        }
        if (url.protocol !== "https:" && url.protocol !== "http:") continue;
        try {
          return await this.transport.retry(signal, async (last) => {
            const res = await this.transport.send(url, { headers, signal });
            if (res.status === 200 || res.status === 206) return this.blobBody(res, offset, desc, what);
            if (!last && isRetryableStatus(res.status)) throw await this.retryLater(res);
            throw await statusError(res, {
              subject: `${what} at ${url.host}`,
              notFound: `${what}: not found at ${raw}`,
            });
          });
        } catch (err) {
          if (signal?.aborted) throw signal.reason;
          urlFailure ??= err instanceof KilnError ? err : networkError(err, url, this.transport.timeouts);
        }
      }
    }
    const name = `${ref.registry}/${ref.repository}`;
    const ctx: StatusContext = { subject: what, notFound: `blob unknown: ${name}@${desc.digest}` };
    try {
      return await this.withEndpoint(ref.registry, signal, (ep) =>
        this.call(
          ep,
          ref.repository,
          `/v2/${ref.repository}/blobs/${desc.digest}`,
          { method: "GET", headers, signal },
          async ({ res, auth }) => {
            if (res.status === 200 || res.status === 206) return this.blobBody(res, offset, desc, what);
            throw await this.failure(ep, res, auth, ctx);
          },
        ),
      );
    } catch (err) {
      if (urlFailure && err instanceof KilnError) {
        throw new KilnError(err.code, `${err.message} (its urls failed too: ${urlFailure.message})`, {
          cause: err,
          details: err.details,
        });
      }
      throw err;
    }
  }

  /** Positions a 200 or 206 body at `offset`: a 200 restarts at 0, so the first `offset` bytes are dropped. */
  private blobBody(res: Response, offset: number, desc: Descriptor, what: string): BlobBody {
    const classify = (err: unknown) => networkError(err, res.url, this.transport.timeouts);
    if (res.status === 200) {
      const length = Number(header(res, "content-length"));
      if (header(res, "content-length") !== undefined && length !== desc.size) {
        discard(res.body);
        throw new KilnError(
          "SIZE_MISMATCH",
          `${what}: ${res.url.host} sends ${length} bytes, the descriptor says ${desc.size}`,
        );
      }
      return { body: res.body, skip: offset, classify };
    }
    const m = /^bytes (\d+)-(\d+)\/(\d+|\*)$/.exec(header(res, "content-range")?.trim() ?? "");
    const start = m ? Number(m[1]) : offset;
    if (start > offset || (m && m[3] !== "*" && Number(m[3]) !== desc.size)) {
      discard(res.body);
      throw new KilnError(
        "REGISTRY_ERROR",
        `${what}: ${res.url.host} answered bytes=${offset}- with Content-Range "${header(res, "content-range")}"`,
      );
    }
    return { body: res.body, skip: offset - start, classify };
  }

  /** Runs `fn` on the registry's endpoint; for docker.io, on each mirror first, falling back on failure. */
  private async withEndpoint<T>(
    registry: string,
    signal: AbortSignal | undefined,
    fn: (ep: Endpoint) => Promise<T>,
  ): Promise<T> {
    const candidates = endpointCandidates(registry, this.policy);
    for (let i = 0; i < candidates.length - 1; i++) {
      try {
        return await fn(await this.endpoint(candidates[i]!, signal));
      } catch {
        if (signal?.aborted) throw signal.reason;
        // A mirror that fails in any way is skipped: docker.io itself is the authority.
      }
    }
    return fn(await this.endpoint(candidates[candidates.length - 1]!, signal));
  }

  /** The endpoint a candidate resolves to, probed once: scheme, and the auth challenge of `/v2/`. */
  private endpoint(c: EndpointCandidate, signal: AbortSignal | undefined): Promise<Endpoint> {
    const key = c.bases.join(" ");
    let found = this.endpoints.get(key);
    if (!found) {
      found = this.probe(c, signal);
      this.endpoints.set(key, found);
      // A dead mirror stays skipped for this client's life; anything else is probed again next time.
      found.catch(() => {
        if ((!c.mirror || signal?.aborted) && this.endpoints.get(key) === found) this.endpoints.delete(key);
      });
    }
    return found;
  }

  /** GET /v2/ on each base in turn (HTTPS, then plain HTTP where allowed) until one answers. */
  private async probe(c: EndpointCandidate, signal: AbortSignal | undefined): Promise<Endpoint> {
    let firstFailure: unknown;
    for (const base of c.bases) {
      const url = new URL(`${base}/v2/`);
      try {
        const challenges = await this.transport.retry(signal, async (last): Promise<Challenge[]> => {
          const res = await this.transport.send(url, { signal, insecure: c.insecure });
          if (res.status === 200 || res.status === 401) {
            await res.body.dump().catch(() => {});
            return parseChallenges(res.headers["www-authenticate"]);
          }
          if (!last && isRetryableStatus(res.status)) throw await this.retryLater(res);
          if (res.status === 404) {
            await res.body.dump().catch(() => {});
            throw new KilnError(
              "REGISTRY_ERROR",
              `${url.host} does not serve the registry API (${url.href} answered 404)`,
            );
          }
          throw await statusError(res, { subject: "/v2/", notFound: `${url.href} not found` });
        });
        const host = new URL(base).host;
        return { base, key: base, registry: c.registry, host, insecure: c.insecure, challenges };
      } catch (err) {
        if (signal?.aborted) throw signal.reason;
        // A certificate that fails verification proves the server speaks TLS: plain HTTP cannot help.
        if (!isConnectionError(err) || isCertificateError(err)) throw err;
        // The HTTPS error (refused, not TLS) says more than plain HTTP's failure after it.
        firstFailure ??= err;
      }
    }
    throw firstFailure;
  }

  /**
   * One request to an endpoint, authorized for pulling `repository`, retried on busy answers and
   * broken connections; `handle` gets every other status.
   */
  private call<T>(
    ep: Endpoint,
    repository: string,
    path: string,
    opts: { method: "GET" | "HEAD"; headers: Record<string, string>; signal: AbortSignal | undefined },
    handle: (r: Authorized, last: boolean) => Promise<T>,
  ): Promise<T> {
    const scope = `repository:${repository}:pull`;
    const url = new URL(`${ep.base}${path}`);
    return this.transport.retry(opts.signal, async (last) => {
      const r = await this.sendAuthorized(ep, scope, url, opts);
      if (!last && isRetryableStatus(r.res.status)) throw await this.retryLater(r.res);
      return handle(r, last);
    });
  }

  /** Sends with the endpoint's credentials; on a 401 that a fresh token or a new challenge may fix, once more. */
  private async sendAuthorized(
    ep: Endpoint,
    scope: string,
    url: URL,
    opts: { method: "GET" | "HEAD"; headers: Record<string, string>; signal: AbortSignal | undefined },
  ): Promise<Authorized> {
    const send = async (auth: Authorization) =>
      this.transport.send(url, {
        method: opts.method,
        headers: auth.value ? { ...opts.headers, authorization: auth.value } : opts.headers,
        signal: opts.signal,
        insecure: ep.insecure,
      });
    let auth = await this.auth.authorize(ep, scope, opts.signal);
    const res = await send(auth);
    if (res.status !== 401) return { res, auth };
    const challenges = parseChallenges(res.headers["www-authenticate"]);
    const unasked = auth.scheme === "none" && challenges.length > 0;
    const stale = auth.scheme === "bearer" && auth.cached;
    if (!unasked && !stale) return { res, auth };
    await res.body.dump().catch(() => {});
    if (challenges.length) ep.challenges = challenges;
    this.auth.forget(ep, scope);
    auth = await this.auth.authorize(ep, scope, opts.signal);
    return { res: await send(auth), auth };
  }

  private async retryLater(res: Response): Promise<RetryLater> {
    const delay = this.transport.retryDelay(res);
    await res.body.dump().catch(() => {});
    return new RetryLater(delay, new KilnError("REGISTRY_ERROR", `${res.url.host} answered ${res.status}`));
  }

  /** The KilnError for an unsuccessful answer, 401 worded by what was sent. */
  private async failure(
    ep: Endpoint,
    res: Response,
    auth: Authorization,
    ctx: StatusContext,
  ): Promise<KilnError> {
    if (res.status !== 401) return statusError(res, ctx);
    const { message } = await errorMessage(res);
    const said = message ? ` (${message})` : "";
    const details = { status: 401, host: res.url.host, registry: ep.registry };
    if (auth.scheme === "basic" && auth.value) {
      return new KilnError("UNAUTHORIZED", `${ep.registry}: invalid username or password${said}`, {
        details,
      });
    }
    if (auth.anonymous) {
      return new KilnError(
        "UNAUTHORIZED",
        `${ep.registry}: access to ${ctx.subject} needs credentials (none found for ${ep.registry}), or it does not exist${said}`,
        { details },
      );
    }
    return new KilnError(
      "UNAUTHORIZED",
      `${ep.registry}: the credentials were refused for ${ctx.subject}${said}`,
      {
        details,
      },
    );
  }
}
