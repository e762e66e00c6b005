import { homedir } from "node:os";
import { isAbsolute, join } from "node:path";

/**
 * The store directory: `KILN_ROOT` if set, else `$XDG_DATA_HOME/kiln`, else `~/.local/share/kiln`.
 * A relative XDG_DATA_HOME is ignored, as the XDG spec says.
 */
export function defaultRoot(env: NodeJS.ProcessEnv = process.env): string {
  if (env.KILN_ROOT) return env.KILN_ROOT;
  if (env.XDG_DATA_HOME && isAbsolute(env.XDG_DATA_HOME)) return join(env.XDG_DATA_HOME, "kiln");
  return join(env.HOME || homedir(), ".local", "share", "kiln");
}

/**
 * Where things live under a store root. `tmp/` sits on the same filesystem as `blobs/`, so a rename
 * from one to the other is atomic.
 */
export interface StoreLayout {
  readonly root: string;
  /** `blobs/sha256/<hex>` */
  readonly blobsDir: string;
  /** Temp files and per-operation staging dirs; whatever a crash leaves here is garbage. */
  readonly tmpDir: string;
  readonly catalogFile: string;
  /** Exported filesystems, `artifacts/<key>` (see Catalog.putArtifact). */
  readonly artifactsDir: string;
}

export function storeLayout(root: string): StoreLayout {
  return {
    root,
    blobsDir: join(root, "blobs", "sha256"),
    tmpDir: join(root, "tmp"),
    catalogFile: join(root, "catalog.db"),
    artifactsDir: join(root, "artifacts"),
  };
}
