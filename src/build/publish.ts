/** Writing user-visible outputs so that a failure never leaves a half-written file at the path. */
import { randomBytes } from "node:crypto";
import { rename, rm, stat } from "node:fs/promises";
import { dirname, join } from "node:path";

/**
 * Runs `write` on a temp path beside `out` (same filesystem, so the rename is atomic) and renames
 * the result over `out` only once it succeeded; on failure the temp path is removed and `out` is
 * left as it was. A directory result replaces a directory at `out`.
 */
export async function replaceAtomically<T>(out: string, write: (tmp: string) => Promise<T>): Promise<T> {
  const tmp = join(dirname(out), `.${randomBytes(6).toString("hex")}.kiln-tmp`);
  try {
    const result = await write(tmp);
    if ((await stat(tmp)).isDirectory()) await rm(out, { recursive: true, force: true });
    await rename(tmp, out);
    return result;
  } catch (err) {
    await rm(tmp, { recursive: true, force: true });
    throw err;
  }
}
