/**
 * Garbage collection: mark what the catalog and the operations in flight need, sweep the rest of
 * blobs/, artifacts/ and tmp/ once it is older than a grace period. Safe while other kiln processes
 * pull, export and build in the same store (see the ordering argument in collectGarbage).
 */
import { randomBytes } from "node:crypto";
import type { Dirent, Stats } from "node:fs";
import { lstat, readdir, rename, rm, unlink } from "node:fs/promises";
import { join, relative, resolve, sep } from "node:path";
import { fsyncPath } from "./blobs.js";
import type { Catalog } from "./catalog.js";
import { leasedDigests } from "./leases.js";
import type { Store } from "./store.js";

export const DEFAULT_GRACE_MS = 60 * 60 * 1000;

/** Largest index or manifest read to find what an index holds. */
const MAX_DOCUMENT_BYTES = 4 * 1024 * 1024;

export interface GcOptions {
  /** Only what is older than this is swept (default 1 h). */
  graceMs?: number | undefined;
  /** Report what would be freed; delete nothing. */
  dryRun?: boolean | undefined;
  /** The clock, for tests (default Date.now()). Also decides which leases have expired. */
  now?: number | undefined;
}

export interface GcReport {
  blobs: { digest: string; size: number }[];
  /** Paths relative to the store root (`artifacts/<key>.ext4`). */
  artifacts: { path: string; size: number }[];
  /** Paths relative to the store root (`tmp/stage-…`). */
  temp: { path: string; size: number }[];
  bytes: number;
  dryRun: boolean;
}

const HEX64 = /^[0-9a-f]{64}$/;
/** Temp names that carry their creator's pid: staging dirs, export temps, GC's own set-asides. */
const PID_IN_NAME = /^(?:stage-(\d+)-|gc-(\d+)-|export-[0-9a-f]+-(\d+)-)/;

/**
 * Collects garbage in `store`.
 *
 * Why listing first and reading the roots second is safe without a lock: a blob, artifact or temp
 * entry that appears after its directory was listed is not a candidate at all. One that was listed
 * was already on disk; if the image (or artifact row) that needs it is recorded before the roots
 * are read, it is a root. If it is recorded after, the writer either holds a lease on it from before
 * it checked the blob was there until after it recorded the image (ingest does), so the lease is a
 * root; or it is a fresh file, younger than the grace period. The one window left, between reading
 * the roots and unlinking, is closed per blob by deleteUnpinnedBlob.
 */
export async function collectGarbage(store: Store, opts: GcOptions = {}): Promise<GcReport> {
  const graceMs = opts.graceMs ?? DEFAULT_GRACE_MS;
  const dryRun = opts.dryRun ?? false;
  const now = opts.now ?? Date.now();
  const cutoff = now - graceMs;
  const report: GcReport = { blobs: [], artifacts: [], temp: [], bytes: 0, dryRun };

  // 1. Candidates: everything old enough, listed before any root is read.
  const blobs = (await listEntries(store.blobs.dir)).filter(
    (e) => HEX64.test(e.name) && e.stats.isFile() && e.stats.mtimeMs < cutoff,
  );
  const artifactFiles = (await listEntries(store.artifactsDir)).filter((e) => !e.name.endsWith(".lock"));
  const temps = (await listEntries(store.tmpDir)).filter((e) => !e.name.endsWith(".lock"));

  // 2. Roots, read after the listing.
  const referenced = await withIndexChildren(store, store.catalog.referencedBlobs());
  const leased = leasedDigests(store.catalog, now);
  const rows = artifactRows(store.catalog);
  const built = builtArtifactKeys(store.catalog);
  const keepRow = (r: ArtifactRow) =>
    referenced.has(r.manifestDigest) || leased.has(r.manifestDigest) || built.has(r.key);
  const rowPaths = new Set(rows.map((r) => r.path));

  // 3. Sweep.
  for (const b of blobs) {
    const digest = `sha256:${b.name}`;
    if (referenced.has(digest) || leased.has(digest)) continue;
    if (!dryRun && (await deleteUnpinnedBlob(store, digest, now)) !== "deleted") continue;
    report.blobs.push({ digest, size: b.stats.size });
  }

  for (const r of rows) {
    if (keepRow(r) || createdMs(r) >= cutoff) continue;
    const file = insideDir(store.artifactsDir, join(store.root, r.path));
    const size = file ? await treeSize(file) : 0;
    if (!dryRun) {
      // Re-checked in the DELETE itself: an image re-pulled meanwhile keeps its artifact.
      if (!dropOrphanArtifact(store.catalog, r.key, now)) continue;
      if (file) await rm(file, { recursive: true, force: true });
    }
    report.artifacts.push({ path: r.path, size });
  }
  for (const e of artifactFiles) {
    const path = relative(store.root, e.path);
    // A file with a row is the row's business (kept, or dropped with it above).
    if (rowPaths.has(path) || (await newestMtime(e)) >= cutoff) continue;
    const size = await treeSize(e.path);
    if (!dryRun) await rm(e.path, { recursive: true, force: true });
    report.artifacts.push({ path, size });
  }

  for (const e of temps) {
    if (ownerAlive(e.name) || (await newestMtime(e)) >= cutoff) continue;
    const size = await treeSize(e.path);
    if (!dryRun) await rm(e.path, { recursive: true, force: true });
    report.temp.push({ path: relative(store.root, e.path), size });
  }

  for (const list of [report.blobs, report.artifacts, report.temp])
    for (const item of list) report.bytes += item.size;
  return report;
}

/**
 * Deletes a blob that no image references and no lease pins, checked AFTER the blob has left
 * blobs/ (it is first renamed aside into tmp/): any operation that saw it present had pinned it
 * before looking, so it is seen here and the blob goes back. A concurrent has() during that moment
 * sees it missing and fetches it again, which is only wasted work. Returns what happened.
 */
export async function deleteUnpinnedBlob(
  store: Store,
  digest: string,
  now: number = Date.now(),
): Promise<"deleted" | "pinned" | "absent"> {
  const final = store.blobs.path(digest);
  const aside = join(
    store.tmpDir,
    `gc-${process.pid}-${randomBytes(4).toString("hex")}-${digest.slice("sha256:".length)}`,
  );
  try {
    await rename(final, aside);
  } catch (err) {
    if (isErrno(err, "ENOENT")) return "absent";
    throw err;
  }
  if (isPinned(store.catalog, digest, now)) {
    // Same verified content as any copy committed meanwhile: replacing it is harmless.
    await rename(aside, final);
    await fsyncPath(store.blobs.dir);
    return "pinned";
  }
  await unlink(aside);
  return "deleted";
}

/**
 * Adds what the indexes among `referenced` hold and the store has: the other children of an index
 * (attestation manifests, platforms pushed into the embedded registry but not recorded as images)
 * and their configs and layers, so that the index the registry serves stays whole.
 */
async function withIndexChildren(store: Store, referenced: Set<string>): Promise<Set<string>> {
  const indexes = store.catalog.guard(
    () =>
      store.catalog.db
        .prepare("SELECT DISTINCT index_digest FROM images WHERE index_digest IS NOT NULL")
        .pluck()
        .all() as string[],
  );
  const out = new Set(referenced);
  const read = async (digest: string): Promise<Record<string, unknown> | undefined> => {
    try {
      return JSON.parse((await store.blobs.readBytes(digest, MAX_DOCUMENT_BYTES)).toString("utf8"));
    } catch {
      return undefined; // absent or not JSON: nothing to keep through it
    }
  };
  const digestsOf = (list: unknown): string[] =>
    Array.isArray(list)
      ? (list.map((d) => (d as { digest?: unknown }).digest).filter((d) => typeof d === "string") as string[])
      : [];
  for (const index of indexes) {
    const doc = await read(index);
    for (const child of digestsOf(doc?.manifests)) {
      if (out.has(child) || !(await store.blobs.has(child))) continue;
      out.add(child);
      const manifest = await read(child);
      for (const d of [...digestsOf([manifest?.config]), ...digestsOf(manifest?.layers)]) out.add(d);
    }
  }
  return out;
}

/** Whether an image references `digest` or an unexpired lease pins it, in one read. */
function isPinned(catalog: Catalog, digest: string, now: number): boolean {
  return catalog.guard(
    () =>
      catalog.db
        .prepare(
          `SELECT 1 FROM images WHERE manifest_digest = @d OR config_digest = @d OR index_digest = @d
           UNION ALL SELECT 1 FROM image_layers WHERE digest = @d
           UNION ALL SELECT 1 FROM leases WHERE digest = @d AND expires_at > @now
           LIMIT 1`,
        )
        .get({ d: digest, now }) !== undefined,
  );
}

interface ArtifactRow {
  key: string;
  manifestDigest: string;
  path: string;
  createdAt: string;
}

function artifactRows(catalog: Catalog): ArtifactRow[] {
  return catalog.guard(
    () =>
      catalog.db
        .prepare(
          "SELECT key, manifest_digest AS manifestDigest, path, created_at AS createdAt FROM artifacts",
        )
        .all() as ArtifactRow[],
  );
}

/** Artifacts that builds (kiln serve) point at, unless the build failed: they are the builds' output. */
function builtArtifactKeys(catalog: Catalog): Set<string> {
  return catalog.guard(
    () =>
      new Set(
        catalog.db
          .prepare("SELECT artifact_key FROM builds WHERE artifact_key IS NOT NULL AND status != 'failed'")
          .pluck()
          .all() as string[],
      ),
  );
}

/** Deletes the row if it is still an orphan now; true when it did. */
function dropOrphanArtifact(catalog: Catalog, key: string, now: number): boolean {
  return catalog.guard(
    () =>
      catalog.db
        .prepare(
          `DELETE FROM artifacts WHERE key = @key
             AND NOT EXISTS (SELECT 1 FROM images WHERE manifest_digest = artifacts.manifest_digest)
             AND NOT EXISTS (SELECT 1 FROM leases WHERE digest = artifacts.manifest_digest AND expires_at > @now)
             AND NOT EXISTS (SELECT 1 FROM builds WHERE artifact_key = artifacts.key AND status != 'failed')`,
        )
        .run({ key, now }).changes === 1,
  );
}

function createdMs(r: ArtifactRow): number {
  const t = Date.parse(r.createdAt);
  return Number.isNaN(t) ? 0 : t;
}

/** `path` if it lies inside `dir` (a row's path is data: never delete outside artifacts/). */
function insideDir(dir: string, path: string): string | undefined {
  const p = resolve(path);
  return p.startsWith(resolve(dir) + sep) ? p : undefined;
}

interface Entry {
  name: string;
  path: string;
  stats: Stats;
}

/** The entries of `dir` with their lstat; a missing dir or an entry deleted meanwhile is skipped. */
async function listEntries(dir: string): Promise<Entry[]> {
  let names: Dirent[];
  try {
    names = await readdir(dir, { withFileTypes: true });
  } catch (err) {
    if (isErrno(err, "ENOENT")) return [];
    throw err;
  }
  const out: Entry[] = [];
  for (const d of names) {
    const path = join(dir, d.name);
    const stats = await lstatOrUndefined(path);
    if (stats) out.push({ name: d.name, path, stats });
  }
  return out;
}

/**
 * The last sign of life of an entry: for a directory, the newest mtime of it and its direct entries
 * (a long download writes into a file inside a staging dir, not into the dir itself).
 */
async function newestMtime(e: Entry): Promise<number> {
  let newest = e.stats.mtimeMs;
  if (!e.stats.isDirectory()) return newest;
  for (const child of await listEntries(e.path)) newest = Math.max(newest, child.stats.mtimeMs);
  return newest;
}

/** Apparent size of a file, or of every file below a directory. */
async function treeSize(path: string): Promise<number> {
  const st = await lstatOrUndefined(path);
  if (!st) return 0;
  if (!st.isDirectory()) return st.size;
  let total = 0;
  for (const child of await listEntries(path)) total += await treeSize(child.path);
  return total;
}

/**
 * Whether the process whose pid a temp entry's name carries still runs (then the entry is its work
 * in progress, however old). A pid reused by another process only delays the sweep.
 */
function ownerAlive(name: string): boolean {
  const m = PID_IN_NAME.exec(name);
  const pid = Number(m?.[1] ?? m?.[2] ?? m?.[3]);
  if (!Number.isInteger(pid) || pid <= 0) return false;
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return isErrno(err, "EPERM");
  }
}

async function lstatOrUndefined(path: string): Promise<Stats | undefined> {
  try {
    return await lstat(path);
  } catch (err) {
    if (isErrno(err, "ENOENT")) return undefined;
    throw err;
  }
}

function isErrno(err: unknown, code: string): boolean {
  return (err as NodeJS.ErrnoException | undefined)?.code === code;
}
