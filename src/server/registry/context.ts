/** What the registry's route handlers share. */
import type { FastifyBaseLogger, FastifyRequest } from "fastify";
import type { ImageRecord } from "../../store/catalog.js";
import { addLease, DEFAULT_LEASE_MS } from "../../store/leases.js";
import type { Store } from "../../store/store.js";
import type { Uploads } from "./uploads.js";

export interface RegistryContext {
  readonly store: Store;
  readonly log: FastifyBaseLogger;
  readonly uploads: Uploads;
  readonly onPushed: ((images: ImageRecord[]) => void | Promise<void>) | undefined;
  /** Manifests pushed by digest in this process, per repository: digest → media type. */
  readonly pushed: Map<string, Map<string, string>>;
  /** Serializes tag pushes of one `repository:tag`. */
  readonly tagLocks: Map<string, Promise<unknown>>;
}

/**
 * Pins blobs a push relies on until its manifest records them (GC must not sweep a layer between
 * its upload and the manifest PUT). One holder per repository; each use renews the digests given.
 */
export function leaseForPush(ctx: RegistryContext, name: string, digests: Iterable<string>): void {
  addLease(ctx.store.catalog, `push-${name}`, digests, DEFAULT_LEASE_MS);
}

/** Whether a request carries a body (fastify passes the raw stream through unread). */
export function hasBody(req: FastifyRequest): boolean {
  const length = req.headers["content-length"];
  return req.headers["transfer-encoding"] !== undefined || (length !== undefined && length !== "0");
}

/** A query parameter as one string (the first when repeated). */
export function queryParam(req: FastifyRequest, key: string): string | undefined {
  const v = (req.query as Record<string, string | string[] | undefined> | undefined)?.[key];
  return Array.isArray(v) ? v[0] : v;
}

/** Runs `fn` after any earlier call with the same key has finished. */
export async function serialized<T>(
  locks: Map<string, Promise<unknown>>,
  key: string,
  fn: () => Promise<T>,
): Promise<T> {
  const prev = locks.get(key) ?? Promise.resolve();
  const run = prev.then(fn, fn);
  const tail = run.catch(() => {});
  locks.set(key, tail);
  try {
    return await run;
  } finally {
    if (locks.get(key) === tail) locks.delete(key);
  }
}
