/**
 * A small distribution-API server for tests: manifests and blobs in memory, Basic or Bearer auth,
 * Range support, and hooks to inject faults (cut connections, errors, redirects).
 */
import { execFileSync } from "node:child_process";
import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import http from "node:http";
import https from "node:https";
import type { AddressInfo, Socket } from "node:net";
import { join } from "node:path";

export interface LoggedRequest {
  method: string;
  path: string;
  headers: http.IncomingHttpHeaders;
}

export interface Served {
  /** `http://127.0.0.1:PORT` */
  url: string;
  /** `127.0.0.1:PORT` */
  host: string;
  port: number;
  requests: LoggedRequest[];
  close(): Promise<void>;
}

export type Handler = (
  req: http.IncomingMessage,
  res: http.ServerResponse,
  body: Buffer,
) => void | Promise<void>;

/** Serves `handler` on a loopback address (HTTP, or HTTPS with `tls`), logging every request. */
export async function serve(
  handler: Handler,
  opts: { address?: string; tls?: { key: string; cert: string } } = {},
): Promise<Served> {
  const requests: LoggedRequest[] = [];
  const sockets = new Set<Socket>();
  const listener = (req: http.IncomingMessage, res: http.ServerResponse) => {
    requests.push({ method: req.method ?? "", path: req.url ?? "", headers: req.headers });
    const chunks: Buffer[] = [];
    req.on("data", (c: Buffer) => chunks.push(c));
    req.on("end", () => {
      Promise.resolve(handler(req, res, Buffer.concat(chunks))).catch((err) => {
        res.statusCode = 500;
        res.end(String(err));
      });
    });
  };
  const server = opts.tls ? https.createServer(opts.tls, listener) : http.createServer(listener);
  server.on("connection", (s: Socket) => {
    sockets.add(s);
    s.on("close", () => sockets.delete(s));
  });
  server.on("secureConnection", (s: Socket) => {
    sockets.add(s);
    s.on("close", () => sockets.delete(s));
  });
  const address = opts.address ?? "127.0.0.1";
  await new Promise<void>((resolve) => server.listen(0, address, resolve));
  const port = (server.address() as AddressInfo).port;
  const host = `${address}:${port}`;
  return {
    url: `${opts.tls ? "https" : "http"}://${host}`,
    host,
    port,
    requests,
    close: () =>
      new Promise<void>((resolve) => {
        for (const s of sockets) s.destroy();
        server.close(() => resolve());
      }),
  };
}

export function sha256(bytes: Buffer | string): string {
  return `sha256:${createHash("sha256").update(bytes).digest("hex")}`;
}

export function json(value: unknown): Buffer {
  return Buffer.from(JSON.stringify(value));
}

interface Repo {
  manifests: Map<string, { mediaType: string; bytes: Buffer }>;
  blobs: Map<string, Buffer>;
}

export type Auth =
  | { kind: "none" }
  | { kind: "basic"; user: string; pass: string }
  | { kind: "bearer"; realm: string; service: string; tokens: TokenServer };

/** The state a token server shares with the registry it serves. */
export interface TokenServer extends Served {
  /** token → the user it was issued to (undefined = anonymous). */
  issued: Map<string, string | undefined>;
  /** Hits on the token endpoint (GET and POST). */
  hits: LoggedRequest[];
}

/**
 * A token server: GET with optional Basic credentials, POST with the OAuth2 refresh-token grant
 * (`refreshTokens`); anonymous tokens unless `anonymous` is false. `oauth: false` answers POST 404.
 */
export async function tokenServer(opts: {
  users?: Record<string, string>;
  refreshTokens?: Record<string, string>;
  anonymous?: boolean;
  oauth?: boolean;
  expiresIn?: number;
}): Promise<TokenServer> {
  const issued = new Map<string, string | undefined>();
  const hits: LoggedRequest[] = [];
  let n = 0;
  const issue = (res: http.ServerResponse, user: string | undefined, field: "token" | "access_token") => {
    const token = `tok-${++n}`;
    issued.set(token, user);
    res.setHeader("content-type", "application/json");
    res.end(JSON.stringify({ [field]: token, expires_in: opts.expiresIn ?? 300 }));
  };
  const refuse = (res: http.ServerResponse, status: number) => {
    res.statusCode = status;
    res.setHeader("content-type", "application/json");
    res.end(JSON.stringify({ details: "incorrect username or password" }));
  };
  const served = await serve((req, res, body) => {
    hits.push({ method: req.method ?? "", path: req.url ?? "", headers: req.headers });
    if (req.method === "POST") {
      if (opts.oauth === false) return refuse(res, 404);
      const form = new URLSearchParams(body.toString("utf8"));
      const user =
        form.get("grant_type") === "refresh_token"
          ? opts.refreshTokens?.[form.get("refresh_token") ?? ""]
          : undefined;
      if (!user) return refuse(res, 401);
      return issue(res, user, "access_token");
    }
    const authz = req.headers.authorization;
    if (authz?.startsWith("Basic ")) {
      const [user, ...rest] = Buffer.from(authz.slice(6), "base64").toString("utf8").split(":");
      const pass = rest.join(":");
      const ok =
        opts.users?.[user!] === pass || (user === "<token>" && opts.refreshTokens?.[pass] !== undefined);
      if (!ok) return refuse(res, 401);
      return issue(res, user === "<token>" ? opts.refreshTokens![pass] : user, "token");
    }
    if (opts.anonymous === false) return refuse(res, 401);
    return issue(res, undefined, "token");
  });
  return Object.assign(served, { issued, hits });
}

export interface ImageParts {
  manifest: Buffer;
  manifestDigest: string;
  config: Buffer;
  configDigest: string;
  layers: { bytes: Buffer; digest: string; mediaType: string }[];
}

/** Builds an OCI image (config + manifest) from layer bytes; the layer bytes need not be real tars. */
export function makeImage(opts: {
  os?: string;
  architecture?: string;
  variant?: string;
  layers?: Buffer[];
  layerMediaType?: string;
  layerUrls?: string[];
  manifestMediaType?: string;
}): ImageParts {
  const layers = (opts.layers ?? [Buffer.from("layer one")]).map((bytes) => ({
    bytes,
    digest: sha256(bytes),
    mediaType: opts.layerMediaType ?? "application/vnd.oci.image.layer.v1.tar+gzip",
  }));
  const config = json({
    architecture: opts.architecture ?? "amd64",
    os: opts.os ?? "linux",
    ...(opts.variant ? { variant: opts.variant } : {}),
    rootfs: { type: "layers", diff_ids: layers.map((l) => l.digest) },
    config: { Cmd: ["/bin/sh"] },
  });
  const mediaType = opts.manifestMediaType ?? "application/vnd.oci.image.manifest.v1+json";
  const configMediaType =
    mediaType === "application/vnd.docker.distribution.manifest.v2+json"
      ? "application/vnd.docker.container.image.v1+json"
      : "application/vnd.oci.image.config.v1+json";
  const manifest = json({
    schemaVersion: 2,
    mediaType,
    config: { mediaType: configMediaType, digest: sha256(config), size: config.length },
    layers: layers.map((l) => ({
      mediaType: l.mediaType,
      digest: l.digest,
      size: l.bytes.length,
      ...(opts.layerUrls ? { urls: opts.layerUrls } : {}),
    })),
  });
  return { manifest, manifestDigest: sha256(manifest), config, configDigest: sha256(config), layers };
}

export interface FaultHooks {
  /** Runs before the registry handles a request; return true when it answered itself. */
  before?: (req: http.IncomingMessage, res: http.ServerResponse) => boolean | Promise<boolean>;
  /** Destroy the connection after this many body bytes of this blob digest, for the next `times` GETs. */
  cut?: { digest: string; after: number; times: number };
  /** Answer blob GETs with 200 and the whole blob, whatever the Range. */
  ignoreRange?: boolean;
  /** Send this (wrong) Docker-Content-Digest with manifests. */
  wrongDigestHeader?: string;
  /** Redirect blob GETs to this base URL (`${base}/blobs/DIGEST`). */
  redirectBlobsTo?: string;
}

/** The registry: `put*` to fill it, `faults` to break it, `auth` to lock it. */
export class FakeRegistry {
  readonly repos = new Map<string, Repo>();
  auth: Auth = { kind: "none" };
  faults: FaultHooks = {};
  /** Repositories that anonymous bearer tokens may not read. */
  readonly privateRepos = new Set<string>();

  private repo(name: string): Repo {
    let r = this.repos.get(name);
    if (!r) {
      r = { manifests: new Map(), blobs: new Map() };
      this.repos.set(name, r);
    }
    return r;
  }

  putBlob(repo: string, bytes: Buffer): string {
    const digest = sha256(bytes);
    this.repo(repo).blobs.set(digest, bytes);
    return digest;
  }

  /** Stores a manifest under its digest and, if given, a tag. */
  putManifest(repo: string, bytes: Buffer, mediaType: string, tag?: string): string {
    const digest = sha256(bytes);
    const r = this.repo(repo);
    r.manifests.set(digest, { mediaType, bytes });
    if (tag) r.manifests.set(tag, { mediaType, bytes });
    return digest;
  }

  putImage(repo: string, image: ImageParts, tag?: string): string {
    this.putBlob(repo, image.config);
    for (const l of image.layers) this.putBlob(repo, l.bytes);
    const mediaType = (JSON.parse(image.manifest.toString()) as { mediaType: string }).mediaType;
    return this.putManifest(repo, image.manifest, mediaType, tag);
  }

  /** An index over images already put, with optional attestation entries. */
  putIndex(
    repo: string,
    entries: { image: ImageParts; platform?: Record<string, string>; annotations?: Record<string, string> }[],
    tag?: string,
  ): string {
    const index = json({
      schemaVersion: 2,
      mediaType: "application/vnd.oci.image.index.v1+json",
      manifests: entries.map((e) => ({
        mediaType: "application/vnd.oci.image.manifest.v1+json",
        digest: e.image.manifestDigest,
        size: e.image.manifest.length,
        ...(e.platform ? { platform: e.platform } : {}),
        ...(e.annotations ? { annotations: e.annotations } : {}),
      })),
    });
    return this.putManifest(repo, index, "application/vnd.oci.image.index.v1+json", tag);
  }

  private error(res: http.ServerResponse, status: number, code: string, message: string): void {
    res.statusCode = status;
    res.setHeader("content-type", "application/json");
    res.end(JSON.stringify({ errors: [{ code, message, detail: null }] }));
  }

  /** Checks the request's credentials; answers 401 itself and returns false when they do not do. */
  private authorized(req: http.IncomingMessage, res: http.ServerResponse, repo: string | undefined): boolean {
    const a = this.auth;
    if (a.kind === "none") return true;
    const authz = req.headers.authorization ?? "";
    if (a.kind === "basic") {
      const want = `Basic ${Buffer.from(`${a.user}:${a.pass}`).toString("base64")}`;
      if (authz === want) return true;
      res.setHeader("www-authenticate", 'Basic realm="fake"');
      this.error(res, 401, "UNAUTHORIZED", "authentication required");
      return false;
    }
    const token = authz.startsWith("Bearer ") ? authz.slice(7) : "";
    const ok =
      a.tokens.issued.has(token) &&
      (!repo || !this.privateRepos.has(repo) || a.tokens.issued.get(token) !== undefined);
    if (ok) return true;
    const scope = repo ? `,scope="repository:${repo}:pull"` : "";
    res.setHeader("www-authenticate", `Bearer realm="${a.realm}",service="${a.service}"${scope}`);
    this.error(res, 401, "UNAUTHORIZED", "authentication required");
    return false;
  }

  readonly handler: Handler = async (req, res) => {
    if (this.faults.before && (await this.faults.before(req, res))) return;
    const url = new URL(req.url ?? "/", "http://x");
    if (url.pathname === "/v2/") {
      if (!this.authorized(req, res, undefined)) return;
      res.setHeader("docker-distribution-api-version", "registry/2.0");
      res.setHeader("content-type", "application/json");
      res.end("{}");
      return;
    }
    const m = /^\/v2\/(.+)\/(manifests|blobs)\/([^/]+)$/.exec(url.pathname);
    if (!m) return this.error(res, 404, "NOT_FOUND", "no such route");
    const [, name, kind, reference] = m as unknown as [string, string, string, string];
    if (!this.authorized(req, res, name)) return;
    const repo = this.repos.get(name);
    if (!repo) return this.error(res, 404, "NAME_UNKNOWN", "repository name not known to registry");
    if (kind === "manifests") {
      const found = repo.manifests.get(reference);
      if (!found) return this.error(res, 404, "MANIFEST_UNKNOWN", "manifest unknown");
      res.setHeader("content-type", found.mediaType);
      res.setHeader("content-length", found.bytes.length);
      res.setHeader("docker-content-digest", this.faults.wrongDigestHeader ?? sha256(found.bytes));
      res.end(req.method === "HEAD" ? undefined : found.bytes);
      return;
    }
    const blob = repo.blobs.get(reference);
    if (!blob) return this.error(res, 404, "BLOB_UNKNOWN", "blob unknown to registry");
    if (this.faults.redirectBlobsTo) {
      res.statusCode = 307;
      res.setHeader("location", `${this.faults.redirectBlobsTo}/blobs/${reference}`);
      res.end();
      return;
    }
    sendBlob(req, res, blob, {
      ignoreRange: this.faults.ignoreRange === true,
      cut: this.cutFor(reference),
    });
  };

  private cutFor(digest: string): number | undefined {
    const c = this.faults.cut;
    if (!c || c.digest !== digest || c.times <= 0) return undefined;
    c.times--;
    return c.after;
  }
}

/** Writes a blob, honouring `Range: bytes=N-` unless told not to; `cut` destroys the socket after that many bytes. */
export function sendBlob(
  req: http.IncomingMessage,
  res: http.ServerResponse,
  blob: Buffer,
  opts: { ignoreRange?: boolean; cut?: number | undefined } = {},
): void {
  let start = 0;
  const range = /^bytes=(\d+)-$/.exec(req.headers.range ?? "");
  if (range && !opts.ignoreRange) {
    start = Number(range[1]);
    res.statusCode = 206;
    res.setHeader("content-range", `bytes ${start}-${blob.length - 1}/${blob.length}`);
  }
  const body = blob.subarray(start);
  res.setHeader("content-type", "application/octet-stream");
  res.setHeader("content-length", body.length);
  if (req.method === "HEAD") {
    res.end();
    return;
  }
  if (opts.cut !== undefined && opts.cut < body.length) {
    // Once the bytes are in the kernel's send buffer, closing still delivers them, then the cut.
    res.write(body.subarray(0, opts.cut), () => res.socket?.destroy());
    return;
  }
  res.end(body);
}

/** A self-signed certificate for `IP:address`, made with openssl in `dir`. */
export function selfSignedCert(
  dir: string,
  address = "127.0.0.1",
): { key: string; cert: string; certFile: string } {
  const keyFile = join(dir, `${address}.key`);
  const certFile = join(dir, `${address}.crt`);
  execFileSync(
    "openssl",
    [
      "req",
      "-x509",
      "-newkey",
      "rsa:2048",
      "-nodes",
      "-keyout",
      keyFile,
      "-out",
      certFile,
      "-days",
      "2",
      "-subj",
      `/CN=${address}`,
      "-addext",
      `subjectAltName=IP:${address}`,
    ],
    { stdio: "ignore" },
  );
  return { key: readFileSync(keyFile, "utf8"), cert: readFileSync(certFile, "utf8"), certFile };
}
