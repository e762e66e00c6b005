/**
 * Registry authentication: WWW-Authenticate challenges, Basic, and Bearer tokens from the
 * challenge's realm (anonymous, Basic credentials, or an OAuth2 refresh token), cached per
 * (endpoint, scope) until they expire.
 */
import { KilnError } from "../errors.js";
import type { Credential, CredentialProvider } from "./credentials.js";
import { errorMessage, readCapped } from "./response.js";
import { isRetryableStatus, type Response, RetryLater, type Transport } from "./transport.js";

export interface Challenge {
  /** Lower case: `bearer`, `basic`. */
  readonly scheme: string;
  /** Parameter names in lower case: `realm`, `service`, `scope`. */
  readonly params: Record<string, string>;
}

const TOKEN = /^[!#$%&'*+.^_`|~0-9A-Za-z-]+/;
const TOKEN_RESPONSE_LIMIT = 1024 * 1024;
/** Docker's floor for a token's lifetime when the server gives none or less. */
const MIN_TOKEN_SECONDS = 60;
/** Renew a little early, so a token does not expire between the check and the request. */
const EXPIRY_MARGIN_MS = 5_000;
const CLIENT_ID = "kiln";

/** Parses WWW-Authenticate values (several challenges per header, several headers) as RFC 7235. */
export function parseChallenges(value: string | string[] | undefined): Challenge[] {
  const values = value === undefined ? [] : Array.isArray(value) ? value : [value];
  const out: { scheme: string; params: Record<string, string> }[] = [];
  for (const s of values) {
    let i = 0;
    let current: { scheme: string; params: Record<string, string> } | undefined;
    while (i < s.length) {
      while (i < s.length && (s[i] === " " || s[i] === "\t" || s[i] === ",")) i++;
      const m = TOKEN.exec(s.slice(i));
      if (!m) break;
      const name = m[0];
      i += name.length;
      while (s[i] === " " || s[i] === "\t") i++;
      if (s[i] === "=" && current) {
        i++;
        while (s[i] === " " || s[i] === "\t") i++;
        let v = "";
        if (s[i] === '"') {
          i++;
          while (i < s.length && s[i] !== '"') {
            if (s[i] === "\\" && i + 1 < s.length) i++;
            v += s[i];
            i++;
          }
          i++;
        } else {
          const t = /^[^,\s]*/.exec(s.slice(i))![0];
          v = t;
          i += t.length;
        }
        current.params[name.toLowerCase()] = v;
      } else {
        current = { scheme: name.toLowerCase(), params: {} };
        out.push(current);
      }
    }
  }
  return out;
}

/** The endpoint a request goes to, as the authenticator needs to know it. */
export interface AuthTarget {
  /** Token cache key: the endpoint's base URL. */
  readonly key: string;
  /** The name credentials are looked up by (`docker.io`, `127.0.0.1:5000`, a mirror's host). */
  readonly registry: string;
  /** The endpoint's host, whose TLS may be unverified (an insecure registry). */
  readonly host: string;
  readonly insecure: boolean;
  challenges: Challenge[];
}

export interface Authorization {
  /** The Authorization header value, if any. */
  readonly value: string | undefined;
  readonly scheme: "bearer" | "basic" | "none";
  /** True when the value came from the cache (so a 401 may mean it went stale). */
  readonly cached: boolean;
  /** True when no credentials were available for the registry. */
  readonly anonymous: boolean;
}

interface Token {
  readonly value: string;
  readonly expiresAt: number;
}

export class Authenticator {
  private readonly tokens = new Map<string, Promise<Token>>();
  private readonly credentialCache = new Map<string, Promise<Credential | undefined>>();

  constructor(
    private readonly transport: Transport,
    private readonly credentials: CredentialProvider | undefined,
    private readonly now: () => number,
  ) {}

  credentialsFor(registry: string): Promise<Credential | undefined> {
    let c = this.credentialCache.get(registry);
    if (!c) {
      c = this.credentials ? this.credentials.get(registry) : Promise.resolve(undefined);
      this.credentialCache.set(registry, c);
      c.catch(() => this.credentialCache.delete(registry));
    }
    return c;
  }

  /** The Authorization header for a request to `target` in `scope` (`repository:NAME:pull`). */
  async authorize(target: AuthTarget, scope: string, signal?: AbortSignal): Promise<Authorization> {
    const bearer = target.challenges.find((c) => c.scheme === "bearer" && c.params.realm);
    const basic = target.challenges.find((c) => c.scheme === "basic");
    if (!bearer && !basic) return { value: undefined, scheme: "none", cached: false, anonymous: true };
    const cred = await this.credentialsFor(target.registry);
    if (!bearer) {
      if (!cred?.username && !cred?.password) {
        return { value: undefined, scheme: "basic", cached: false, anonymous: true };
      }
      const value = `Basic ${Buffer.from(`${cred.username ?? ""}:${cred.password ?? ""}`).toString("base64")}`;
      return { value, scheme: "basic", cached: false, anonymous: false };
    }
    const key = `${target.key} ${scope}`;
    const existing = this.tokens.get(key);
    if (existing) {
      const token = await existing.catch(() => undefined);
      if (token && token.expiresAt > this.now()) {
        return { value: `Bearer ${token.value}`, scheme: "bearer", cached: true, anonymous: !cred };
      }
      if (this.tokens.get(key) === existing) this.tokens.delete(key);
    }
    let pending = this.tokens.get(key);
    if (!pending) {
      pending = this.fetchToken(target, bearer.params, scope, cred, signal);
      this.tokens.set(key, pending);
      pending.catch(() => {
        if (this.tokens.get(key) === pending) this.tokens.delete(key);
      });
    }
    const token = await pending;
    return { value: `Bearer ${token.value}`, scheme: "bearer", cached: false, anonymous: !cred };
  }

  /** Drops a cached token that the registry refused. */
  forget(target: AuthTarget, scope: string): void {
    this.tokens.delete(`${target.key} ${scope}`);
  }

  private async fetchToken(
    target: AuthTarget,
    params: Record<string, string>,
    scope: string,
    cred: Credential | undefined,
    signal: AbortSignal | undefined,
  ): Promise<Token> {
    let realm: URL;
    try {
      realm = new URL(params.realm!);
    } catch {
      throw new KilnError(
        "REGISTRY_ERROR",
        `${target.registry} names an invalid token realm "${params.realm}"`,
      );
    }
    if (cred?.identityToken) {
      const viaOAuth = await this.fetchOAuthToken(target, realm, params, scope, cred.identityToken, signal);
      if (viaOAuth) return viaOAuth;
      // The token server has no OAuth2 endpoint: docker then sends the identity token as Basic.
      return this.fetchBasicToken(
        target,
        realm,
        params,
        scope,
        { username: cred.username || "<token>", password: cred.identityToken },
        signal,
      );
    }
    return this.fetchBasicToken(target, realm, params, scope, cred, signal);
  }

  private fetchBasicToken(
    target: AuthTarget,
    realm: URL,
    params: Record<string, string>,
    scope: string,
    cred: Credential | undefined,
    signal: AbortSignal | undefined,
  ): Promise<Token> {
    const url = new URL(realm);
    if (params.service) url.searchParams.set("service", params.service);
    url.searchParams.append("scope", scope);
    const headers: Record<string, string> = {};
    if (cred && (cred.username || cred.password)) {
      if (cred.username) url.searchParams.set("account", cred.username);
      headers.authorization = `Basic ${Buffer.from(`${cred.username ?? ""}:${cred.password ?? ""}`).toString("base64")}`;
    }
    return this.transport.retry(signal, async (last) => {
      const res = await this.transport.send(url, {
        headers,
        signal,
        insecure: target.insecure && url.host === target.host,
      });
      if (res.status === 200) return this.readToken(res, target, url);
      return this.tokenFailure(res, last, target, scope, url, cred !== undefined);
    });
  }

  /** The OAuth2 refresh-token grant, as docker does for identity tokens; undefined when unsupported. */
  private fetchOAuthToken(
    target: AuthTarget,
    realm: URL,
    params: Record<string, string>,
    scope: string,
    refreshToken: string,
    signal: AbortSignal | undefined,
  ): Promise<Token | undefined> {
    const form = new URLSearchParams({
      grant_type: "refresh_token",
      refresh_token: refreshToken,
      client_id: CLIENT_ID,
      scope,
    });
    if (params.service) form.set("service", params.service);
    return this.transport.retry(signal, async (last) => {
      const res = await this.transport.send(realm, {
        method: "POST",
        headers: { "content-type": "application/x-www-form-urlencoded" },
        body: form.toString(),
        signal,
        insecure: target.insecure && realm.host === target.host,
      });
      if (res.status === 200) return this.readToken(res, target, realm);
      if (res.status === 404 || res.status === 405) {
        await res.body.dump().catch(() => {});
        return undefined;
      }
      return this.tokenFailure(res, last, target, scope, realm, true);
    });
  }

  private async readToken(res: Response, target: AuthTarget, url: URL): Promise<Token> {
    const bytes = await readCapped(
      res,
      TOKEN_RESPONSE_LIMIT,
      `token response from ${url.host}`,
      this.transport,
    );
    let doc: { token?: unknown; access_token?: unknown; expires_in?: unknown; issued_at?: unknown };
    try {
      doc = JSON.parse(bytes.toString("utf8"));
    } catch {
      throw new KilnError(
        "REGISTRY_ERROR",
        `token server ${url.host} (for ${target.registry}) answered with no JSON`,
      );
    }
    const value =
      typeof doc.token === "string" && doc.token
        ? doc.token
        : typeof doc.access_token === "string"
          ? doc.access_token
          : "";
    if (!value) {
      throw new KilnError(
        "REGISTRY_ERROR",
        `token server ${url.host} (for ${target.registry}) returned no token`,
      );
    }
    const seconds =
      typeof doc.expires_in === "number" && doc.expires_in > MIN_TOKEN_SECONDS
        ? doc.expires_in
        : MIN_TOKEN_SECONDS;
    return { value, expiresAt: this.now() + seconds * 1000 - EXPIRY_MARGIN_MS };
  }

  /** Throws the KilnError (or RetryLater) a token server's refusal means. */
  private async tokenFailure(
    res: Response,
    last: boolean,
    target: AuthTarget,
    scope: string,
    url: URL,
    hadCredentials: boolean,
  ): Promise<never> {
    if (!last && isRetryableStatus(res.status)) {
      const delay = this.transport.retryDelay(res);
      await res.body.dump().catch(() => {});
      throw new RetryLater(
        delay,
        new KilnError(
          "REGISTRY_ERROR",
          `token server ${url.host} answered ${res.status} for ${target.registry}`,
        ),
      );
    }
    const { message } = await errorMessage(res);
    const said = message ? `: ${message}` : "";
    const details = { status: res.status, host: url.host, registry: target.registry };
    if (res.status === 401 || (res.status === 400 && /invalid_grant/.test(message ?? ""))) {
      throw new KilnError(
        "UNAUTHORIZED",
        hadCredentials
          ? `${target.registry}: invalid credentials (token server ${url.host} answered ${res.status}${said})`
          : `${target.registry} requires authentication and no credentials were found (token server ${url.host} answered ${res.status}${said})`,
        { details },
      );
    }
    if (res.status === 403) {
      throw new KilnError("DENIED", `${target.registry}: token server ${url.host} denied ${scope}${said}`, {
        details,
      });
    }
    throw new KilnError(
      "REGISTRY_ERROR",
      `${target.registry}: token server ${url.host} answered ${res.status}${said}`,
      { details },
    );
  }
}
