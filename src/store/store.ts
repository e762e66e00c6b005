import { mkdir, rm, stat } from "node:fs/promises";
import { dirname, join, resolve } from "node:path";
import { KilnError } from "../errors.js";
import { BlobStore } from "./blobs.js";
import { Catalog, type ImageRecord } from "./catalog.js";
import { deleteUnpinnedBlob } from "./gc.js";
import { defaultRoot, storeLayout } from "./root.js";

/** An open store: blobs on disk plus the catalog that says which images use them. */
export interface Store {
  readonly root: string;
  /** Temp files and staging dirs, on the blobs' filesystem. */
  readonly tmpDir: string;
  /** Exported filesystems (the cache `kiln export` fills). */
  readonly artifactsDir: string;
  readonly blobs: BlobStore;
  readonly catalog: Catalog;
  close(): void;
}

/** Opens (creating as needed) the store at `root`, by default defaultRoot(). */
export async function openStore(root: string = defaultRoot()): Promise<Store> {
  const layout = storeLayout(resolve(root));
  await makeDirs(layout.blobsDir);
  await makeDirs(layout.tmpDir);
  const catalog = Catalog.open(layout.catalogFile);
  return {
    root: layout.root,
    tmpDir: layout.tmpDir,
    artifactsDir: layout.artifactsDir,
    blobs: new BlobStore(layout.root),
    catalog,
    close: () => catalog.close(),
  };
}

/**
 * `mkdir -p`, one directory at a time. Node 20's recursive mkdir never returns where mkdir fails with
 * ENOENT below a parent that exists (under /proc); a dangling symlink or a file in the way is named.
 */
async function makeDirs(dir: string): Promise<void> {
  const missing: string[] = [];
  for (let d = dir; ; d = dirname(d)) {
    const st = await stat(d).catch(() => undefined);
    if (st?.isDirectory()) break;
    if (st) throw new KilnError("STORE", `cannot create the store: ${d} is not a directory`);
    missing.push(d);
    if (dirname(d) === d) break;
  }
  for (const d of missing.reverse()) {
    await mkdir(d).catch(async (err: NodeJS.ErrnoException) => {
      // Another process may have made it meanwhile.
      if (err.code === "EEXIST" && (await stat(d).catch(() => undefined))?.isDirectory()) return;
      const why = err.code === "EEXIST" ? "a dangling symlink or another file is in the way" : err.message;
      throw new KilnError("STORE", `cannot create the store directory ${d}: ${why}`, { cause: err });
    });
  }
}

/**
 * Removes images from the catalog, then deletes the blobs that belonged to them and that no
 * remaining image references. Only those: a blob another process's pull has just committed but not
 * yet recorded belongs to no removed image, so it is left alone.
 *
 * A concurrent pull that found one of these blobs already present (and so did not stage it) holds
 * a lease on it from before it looked until its image is recorded; deleteUnpinnedBlob checks leases
 * and references after the blob has left blobs/, so such a blob stays (and GC frees it later if the
 * pull fails).
 */
export async function removeImages(store: Store, records: readonly ImageRecord[]): Promise<void> {
  const candidates = new Set<string>();
  for (const image of records) {
    candidates.add(image.manifestDigest);
    candidates.add(image.configDigest);
    if (image.indexDigest !== null) candidates.add(image.indexDigest);
    for (const layer of image.layers) candidates.add(layer.digest);
    store.catalog.remove(image.id);
  }
  // Read after the removals, so an image recorded meanwhile by another process keeps its blobs.
  const referenced = store.catalog.referencedBlobs();
  for (const digest of candidates) {
    if (referenced.has(digest)) continue;
    if ((await deleteUnpinnedBlob(store, digest)) === "pinned") continue;
    // Exported filesystems of a manifest no image has any more go with it.
    for (const artifact of store.catalog.artifactsOf(digest)) {
      store.catalog.removeArtifact(artifact.key);
      await rm(join(store.root, artifact.path), { force: true, recursive: true });
    }
  }
}
