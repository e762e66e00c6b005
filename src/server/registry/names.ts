/**
 * A registry path's repository name IS an image name in the docker grammar: `/v2/myapp/…` is
 * `docker.io/library/myapp`, `/v2/library/alpine/…` is `docker.io/library/alpine`, and
 * `/v2/ghcr.io/org/x/…` is `ghcr.io/org/x`. So a push of `HOST/myapp:v1` is recorded as
 * `myapp:v1` (as `docker load` would), and docker's `registry-mirrors` can pull from kiln.
 */
import { isKilnError } from "../../errors.js";
import { DEFAULT_REGISTRY, type ImageRef, parseReference, refName } from "../../reference/reference.js";
import { RegistryError } from "./errors.js";

export interface RepoName {
  /** As written in the request path (kept for Location headers). */
  readonly path: string;
  /** `docker.io/library/myapp`: the catalog's repository column. */
  readonly name: string;
  /** The name as a reference without tag or digest. */
  readonly ref: ImageRef;
}

/** Parses a request's repository name; anything not a plain name → NAME_INVALID. */
export function parseRepoName(path: string): RepoName {
  const last = path.slice(path.lastIndexOf("/") + 1);
  if (path.includes("@") || last.includes(":")) {
    throw new RegistryError("NAME_INVALID", `invalid repository name "${path}": it names a tag or digest`);
  }
  let ref: ImageRef;
  try {
    ref = parseReference(path);
  } catch (err) {
    if (isKilnError(err, "INVALID_REFERENCE")) {
      throw new RegistryError("NAME_INVALID", `invalid repository name "${path}": ${err.message}`, {
        cause: err,
      });
    }
    throw err;
  }
  const bare: ImageRef = {
    registry: ref.registry,
    repository: ref.repository,
    tag: undefined,
    digest: undefined,
  };
  return { path, name: refName(bare), ref: bare };
}

/** The path a catalog repository is served under: docker.io names without the registry. */
export function repoPath(repository: string): string {
  const prefix = `${DEFAULT_REGISTRY}/`;
  return repository.startsWith(prefix) ? repository.slice(prefix.length) : repository;
}
