import { KilnError } from "../errors.js";
import { type Digest, parseDigest } from "./digest.js";

/**
 * A normalized image reference, following the docker/distribution grammar:
 * `alpine` → `docker.io/library/alpine:latest`.
 */
export interface ImageRef {
  /** Registry host as written (`docker.io`, `ghcr.io`, `localhost:5000`, `127.0.0.1:5055`). */
  readonly registry: string;
  /** Repository path inside the registry (`library/alpine`). */
  readonly repository: string;
  /** The tag; `latest` when neither tag nor digest was given, undefined when only a digest was. */
  readonly tag: string | undefined;
  /** The digest, when given; it wins over the tag for resolution. */
  readonly digest: Digest | undefined;
}

export const DEFAULT_REGISTRY = "docker.io";
const LEGACY_DEFAULT_REGISTRIES = new Set(["index.docker.io", "registry-1.docker.io"]);
const MAX_NAME_LENGTH = 255;

// domain-component, optionally dotted, optional port; or a bracketed IPv6 literal with optional port.
const DOMAIN =
  /^(?:(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])(?:\.(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]))*|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?$/;
// path-component: lowercase alphanumerics joined by `.`, `_`, `__` or runs of `-`.
const PATH_COMPONENT = /^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$/;
const TAG = /^[\w][\w.-]{0,127}$/;

function invalid(input: string, why: string): KilnError {
  return new KilnError("INVALID_REFERENCE", `invalid reference "${input}": ${why}`);
}

/** Parses a user's image reference and normalizes it the way docker does. */
export function parseReference(input: string): ImageRef {
  let text = input.trim();
  // skopeo and crane users write the transport: `docker://` names the registry kiln reads anyway.
  if (text.startsWith("docker://")) text = text.slice("docker://".length);
  const scheme = /^[a-zA-Z][a-zA-Z0-9+.-]*:\/\//.exec(text);
  if (scheme) {
    throw invalid(
      input,
      `a registry reference has no scheme: use ${text.slice(scheme[0].length) || "host/repo:tag"}`,
    );
  }
  if (text === "") throw invalid(input, "empty name");
  if (/\s/.test(text)) throw invalid(input, "contains whitespace");

  let rest = text;
  let digest: Digest | undefined;
  const at = rest.indexOf("@");
  if (at >= 0) {
    try {
      digest = parseDigest(rest.slice(at + 1));
    } catch (err) {
      throw invalid(input, (err as Error).message.replace(/^invalid digest /, "digest "));
    }
    rest = rest.slice(0, at);
  }

  let tag: string | undefined;
  const lastSlash = rest.lastIndexOf("/");
  const lastColon = rest.lastIndexOf(":");
  if (lastColon > lastSlash) {
    tag = rest.slice(lastColon + 1);
    rest = rest.slice(0, lastColon);
    if (!TAG.test(tag)) throw invalid(input, `bad tag "${tag}"`);
  }
  if (rest === "") throw invalid(input, "empty name");

  let registry = DEFAULT_REGISTRY;
  let path = rest;
  const firstSlash = rest.indexOf("/");
  if (firstSlash >= 0) {
    const first = rest.slice(0, firstSlash);
    // As docker: the first component is a registry if it looks like a host (a dot, a port, localhost)
    // or has capitals (which a repository cannot have).
    if (/[.:]/.test(first) || first === "localhost" || first !== first.toLowerCase()) {
      if (!DOMAIN.test(first)) throw invalid(input, `bad registry host "${first}"`);
      registry = LEGACY_DEFAULT_REGISTRIES.has(first) ? DEFAULT_REGISTRY : first;
      path = rest.slice(firstSlash + 1);
    }
  }
  if (path === "") throw invalid(input, "empty repository name");
  const components = path.split("/");
  for (const c of components) {
    if (c === "") throw invalid(input, "empty path component");
    if (c !== c.toLowerCase()) throw invalid(input, "repository name must be lowercase");
    if (!PATH_COMPONENT.test(c)) throw invalid(input, `bad repository component "${c}"`);
  }
  if (registry === DEFAULT_REGISTRY && components.length === 1) path = `library/${path}`;
  if (`${registry}/${path}`.length > MAX_NAME_LENGTH) {
    throw invalid(input, `repository name longer than ${MAX_NAME_LENGTH} characters`);
  }
  if (tag === undefined && digest === undefined) tag = "latest";
  return { registry, repository: path, tag, digest };
}

/** `registry/repository` */
export function refName(ref: ImageRef): string {
  return `${ref.registry}/${ref.repository}`;
}

/** The full normalized string: `docker.io/library/alpine:3.20`, `…@sha256:…`, or both. */
export function formatReference(ref: ImageRef): string {
  let s = refName(ref);
  if (ref.tag !== undefined) s += `:${ref.tag}`;
  if (ref.digest !== undefined) s += `@${ref.digest.value}`;
  return s;
}

/** What a request to the registry names: the digest when there is one (it wins), else the tag. */
export function refIdentifier(ref: ImageRef): string {
  return ref.digest?.value ?? ref.tag ?? "latest";
}

/** The same reference pinned to a digest, keeping the tag for display. */
export function withDigest(ref: ImageRef, digest: Digest): ImageRef {
  return { ...ref, digest };
}

/** The short form docker shows: `alpine:3.20` for official images, `user/app:tag`, full name otherwise. */
export function familiarName(ref: ImageRef): string {
  let name = refName(ref);
  if (ref.registry === DEFAULT_REGISTRY) {
    name = ref.repository.startsWith("library/") ? ref.repository.slice("library/".length) : ref.repository;
  }
  if (ref.tag !== undefined) name += `:${ref.tag}`;
  if (ref.digest !== undefined) name += `@${ref.digest.value}`;
  return name;
}
