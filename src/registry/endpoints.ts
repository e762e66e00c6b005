/**
 * Where a registry name is reached: docker.io's API host and mirrors, and which hosts may be spoken
 * to over plain HTTP (the insecure list, and loopback names by default, as docker does).
 */
import { KilnError } from "../errors.js";

export const DOCKER_HUB = "docker.io";
export const DOCKER_HUB_API = "https://registry-1.docker.io";

/** One place to try a registry at. */
export interface EndpointCandidate {
  /** The name credentials are looked up by: the registry, or a mirror's host. */
  readonly registry: string;
  /** Base URLs to try in order, HTTPS first; the first that connects is kept. */
  readonly bases: readonly string[];
  /** Skip TLS verification (the host is in the insecure list). */
  readonly insecure: boolean;
  /** A docker.io mirror: on any failure the next candidate is tried. */
  readonly mirror: boolean;
}

export interface EndpointPolicy {
  readonly insecureRegistries: readonly string[];
  readonly registryMirrors: readonly string[];
}

/** Loopback names docker allows plain HTTP to without configuration. */
const LOOPBACK = new Set(["localhost", "127.0.0.1", "::1", "[::1]"]);

/** `host`, `host:port`, `[v6]:port` → hostname (brackets kept for v6) and port. */
export function splitHost(hostport: string): { hostname: string; port: string | undefined } {
  const m = /^(\[[^\]]*\]|[^:/]+)(?::(\d+))?$/.exec(hostport.trim().toLowerCase());
  if (!m) return { hostname: hostport.toLowerCase(), port: undefined };
  return { hostname: m[1]!, port: m[2] };
}

function stripScheme(entry: string): string {
  return entry
    .trim()
    .replace(/^[a-z][a-z0-9+.-]*:\/\//i, "")
    .replace(/\/+$/, "");
}

/** Whether `registry` (`host[:port]`) is listed: an entry with a port matches that port only. */
export function isListedInsecure(registry: string, insecureRegistries: readonly string[]): boolean {
  const r = splitHost(registry);
  return insecureRegistries.some((raw) => {
    const e = splitHost(stripScheme(raw));
    return e.hostname === r.hostname && (e.port === undefined || e.port === r.port);
  });
}

/** Whether plain HTTP may be used: listed as insecure, or a loopback name. */
export function allowsPlainHttp(registry: string, insecureRegistries: readonly string[]): boolean {
  return LOOPBACK.has(splitHost(registry).hostname) || isListedInsecure(registry, insecureRegistries);
}

function parseMirror(raw: string): URL {
  const text = /^[a-z][a-z0-9+.-]*:\/\//i.test(raw.trim()) ? raw.trim() : `https://${raw.trim()}`;
  let url: URL;
  try {
    url = new URL(text);
  } catch {
    throw new KilnError("INVALID_ARGUMENT", `invalid registry mirror "${raw}": not a URL`);
  }
  if (url.protocol !== "https:" && url.protocol !== "http:") {
    throw new KilnError("INVALID_ARGUMENT", `invalid registry mirror "${raw}": needs http:// or https://`);
  }
  if (url.search || url.hash) {
    throw new KilnError("INVALID_ARGUMENT", `invalid registry mirror "${raw}": no query or fragment allowed`);
  }
  return url;
}

/** Validates mirror URLs once, up front, so a typo is reported before any pull. */
export function validateMirrors(mirrors: readonly string[]): void {
  for (const m of mirrors) parseMirror(m);
}

/** The endpoints to try for a registry name, in order. */
export function endpointCandidates(registry: string, policy: EndpointPolicy): EndpointCandidate[] {
  if (registry === DOCKER_HUB) {
    const mirrors = policy.registryMirrors.map((raw): EndpointCandidate => {
      const url = parseMirror(raw);
      return {
        registry: url.host,
        bases: [`${url.origin}${url.pathname.replace(/\/+$/, "")}`],
        insecure: isListedInsecure(url.host, policy.insecureRegistries),
        mirror: true,
      };
    });
    return [...mirrors, { registry: DOCKER_HUB, bases: [DOCKER_HUB_API], insecure: false, mirror: false }];
  }
  const host = registry.toLowerCase();
  const insecure = isListedInsecure(host, policy.insecureRegistries);
  const bases = allowsPlainHttp(host, policy.insecureRegistries)
    ? [`https://${host}`, `http://${host}`]
    : [`https://${host}`];
  return [{ registry, bases, insecure, mirror: false }];
}
