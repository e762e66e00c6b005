/**
 * Leases pin blobs an operation in flight relies on but no image records yet (a pull that found a
 * layer already present, an upload to the embedded registry waiting for its manifest, a build), so
 * GC leaves them alone. A lease expires on its own: a crashed holder pins nothing for long.
 */
import { randomBytes } from "node:crypto";
import type { Catalog } from "./catalog.js";

/** How long a lease lasts unless renewed or released: longer than any single step of a pull. */
export const DEFAULT_LEASE_MS = 60 * 60 * 1000;

/** A unique holder name for one operation: `pull-<pid>-<random>`. */
export function leaseHolder(kind: string): string {
  return `${kind}-${process.pid}-${randomBytes(6).toString("hex")}`;
}

/** Pins `digests` for `holder` until `ttlMs` from now (renewing any it already holds). */
export function addLease(
  catalog: Catalog,
  holder: string,
  digests: Iterable<string>,
  ttlMs: number = DEFAULT_LEASE_MS,
): void {
  const expires = Date.now() + ttlMs;
  catalog.guard(() => {
    const put = catalog.db.prepare(
      "INSERT OR REPLACE INTO leases (holder, digest, expires_at) VALUES (?, ?, ?)",
    );
    catalog.db.transaction(() => {
      for (const d of digests) put.run(holder, d, expires);
    })();
  });
}

/** Drops every lease of `holder`. */
export function releaseLease(catalog: Catalog, holder: string): void {
  catalog.guard(() => catalog.db.prepare("DELETE FROM leases WHERE holder = ?").run(holder));
}

/** Digests under a lease that has not expired; expired leases are deleted on the way. */
export function leasedDigests(catalog: Catalog, now: number = Date.now()): Set<string> {
  return catalog.guard(() => {
    catalog.db.prepare("DELETE FROM leases WHERE expires_at <= ?").run(now);
    const rows = catalog.db
      .prepare("SELECT DISTINCT digest FROM leases WHERE expires_at > ?")
      .pluck()
      .all(now) as string[];
    return new Set(rows);
  });
}

/** Runs `fn` holding a lease on nothing yet; `pin` adds digests to it. The lease ends with `fn`. */
export async function withLease<T>(
  catalog: Catalog,
  kind: string,
  fn: (pin: (digests: Iterable<string>) => void) => Promise<T>,
): Promise<T> {
  const holder = leaseHolder(kind);
  try {
    return await fn((digests) => addLease(catalog, holder, digests));
  } finally {
    releaseLease(catalog, holder);
  }
}
