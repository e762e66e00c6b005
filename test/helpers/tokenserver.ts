import { createPrivateKey, type KeyObject, randomUUID, sign } from "node:crypto";
import { createServer, type IncomingMessage, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import { makeSigningCert } from "./tls.js";

export interface Creds {
  user: string;
  pass: string;
}

export interface TokenServerOptions {
  /** Directory for the signing key and certificate. */
  dir: string;
  /** The registry's `auth.token.service`, the token's `aud`. */
  service: string;
  issuer?: string;
  users: Creds[];
  /** Give anonymous callers pull access (else their token grants nothing). */
  anonymousPull?: boolean;
  /** Token lifetime; default 300 s. */
  ttlSeconds?: number;
}

/** One request the token server answered: who asked, for which scopes, with which status. */
export interface TokenRequest {
  user: string | null;
  scopes: string[];
  status: number;
}

export interface TokenServer {
  /** `http://127.0.0.1:PORT/token`, the registry's `auth.token.realm`. */
  realm: string;
  service: string;
  issuer: string;
  /** The certificate the registry trusts (`auth.token.rootcertbundle`). */
  rootCertFile: string;
  /** Every request so far, oldest first; tests assert caching with `tokenRequests`. */
  requests: TokenRequest[];
  readonly tokenRequests: number;
  stop(): Promise<void>;
}

interface Access {
  type: string;
  name: string;
  actions: string[];
}

/**
 * A Docker token server (distribution's "token" auth): GET /token?service=S&scope=T:NAME:ACTIONS
 * with optional Basic credentials answers an RS256 JWT. The `x5c` header chains to the
 * registry's rootcertbundle, which is how distribution 2.8 finds the verification key.
 */
export async function startTokenServer(opts: TokenServerOptions): Promise<TokenServer> {
  const cert = await makeSigningCert(opts.dir);
  const key = createPrivateKey(cert.keyPem);
  const issuer = opts.issuer ?? "kiln-test-issuer";
  const ttl = opts.ttlSeconds ?? 300;
  const requests: TokenRequest[] = [];

  const server = createServer((req, res) => {
    const record = (user: string | null, scopes: string[], status: number) =>
      requests.push({ user, scopes, status });
    const url = new URL(req.url ?? "/", "http://x");
    const scopes = url.searchParams.getAll("scope").flatMap((s) => s.split(" ").filter(Boolean));
    if (req.method !== "GET" || url.pathname !== "/token") {
      record(null, scopes, 404);
      return reply(res, 404, { errors: [{ code: "NOT_FOUND", message: "only GET /token" }] });
    }
    const who = basicUser(req);
    if (who !== null && !opts.users.some((u) => u.user === who.user && u.pass === who.pass)) {
      record(who.user, scopes, 401);
      res.setHeader("WWW-Authenticate", 'Basic realm="kiln-test"');
      return reply(res, 401, { errors: [{ code: "UNAUTHORIZED", message: "bad credentials" }] });
    }
    const user = who?.user ?? null;
    const access = scopes.flatMap((s) => grant(parseScope(s), user !== null, opts.anonymousPull ?? false));
    const now = Math.floor(Date.now() / 1000);
    const claims = {
      iss: issuer,
      sub: user ?? "",
      aud: url.searchParams.get("service") ?? opts.service,
      exp: now + ttl,
      nbf: now - 1,
      iat: now,
      jti: randomUUID(),
      access,
    };
    const token = signJwt(claims, key, cert.certB64);
    record(user, scopes, 200);
    reply(res, 200, {
      token,
      access_token: token,
      expires_in: ttl,
      issued_at: new Date(now * 1000).toISOString(),
    });
  });
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => resolve());
  });
  const { port } = server.address() as AddressInfo;
  let stopped: Promise<void> | undefined;
  return {
    realm: `http://127.0.0.1:${port}/token`,
    service: opts.service,
    issuer,
    rootCertFile: cert.certFile,
    requests,
    get tokenRequests() {
      return requests.length;
    },
    stop() {
      stopped ??= new Promise((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      });
      return stopped;
    },
  };
}

function reply(res: ServerResponse, status: number, body: unknown): void {
  res.writeHead(status, { "Content-Type": "application/json" });
  res.end(JSON.stringify(body));
}

function basicUser(req: IncomingMessage): Creds | null {
  const h = req.headers.authorization;
  if (!h?.toLowerCase().startsWith("basic ")) return null;
  const text = Buffer.from(h.slice(6).trim(), "base64").toString("utf8");
  const i = text.indexOf(":");
  return i < 0 ? { user: text, pass: "" } : { user: text.slice(0, i), pass: text.slice(i + 1) };
}

/** `repository:a/b:pull,push` → type, name, actions (a name may hold a registry host:port). */
function parseScope(scope: string): Access | null {
  const first = scope.indexOf(":");
  const last = scope.lastIndexOf(":");
  if (first < 0 || last === first) return null;
  return {
    type: scope.slice(0, first),
    name: scope.slice(first + 1, last),
    actions: scope
      .slice(last + 1)
      .split(",")
      .filter(Boolean),
  };
}

/** Users get pull and push on any repository (and the catalog); anonymous callers pull at most. */
function grant(want: Access | null, authenticated: boolean, anonymousPull: boolean): Access[] {
  if (want === null) return [];
  let allowed: string[];
  if (want.type === "repository") allowed = authenticated ? ["pull", "push"] : anonymousPull ? ["pull"] : [];
  else if (want.type === "registry" && want.name === "catalog") allowed = authenticated ? ["*"] : [];
  else allowed = [];
  const actions = want.actions.filter((a) => allowed.includes(a));
  return actions.length > 0 ? [{ type: want.type, name: want.name, actions }] : [];
}

function b64url(data: Buffer | string): string {
  return Buffer.from(data).toString("base64url");
}

function signJwt(claims: object, key: KeyObject, certB64: string): string {
  const header = { typ: "JWT", alg: "RS256", x5c: [certB64] };
  const input = `${b64url(JSON.stringify(header))}.${b64url(JSON.stringify(claims))}`;
  // RSA keys sign PKCS#1 v1.5 by default: exactly RS256.
  const sig = sign("sha256", Buffer.from(input), key);
  return `${input}.${b64url(sig)}`;
}
