/** Writing user-visible outputs so that a failure never leaves a half-written file at the path. */
import { randomBytes } from "node:crypto";
import { lstat, rename, rm, stat } from "node:fs/promises";
import { dirname, join } from "node:path";
import { KilnError } from "../errors.js";

/**
 * Runs `write` on a temp path beside `out` (same filesystem, so the rename is atomic) and renames
 * the result over `out` only once it succeeded; on failure the temp path is removed and `out` is
 * left as it was. A directory result replaces whatever is at `out`, and a file result replaces a
 * directory there: callers check first what may be replaced (src/build/output-path.ts). `tmp`: a temp path chosen
 * beforehand, beside `out` (a staged image, src/fs/staging.ts).
 */
export async function replaceAtomically<T>(
  out: string,
  write: (tmp: string) => Promise<T>,
  tmp = join(dirname(out), `.${randomBytes(6).toString("hex")}.kiln-tmp`),
): Promise<T> {
  await checkOutputDir(out);
  try {
    const result = await write(tmp);
    // A directory on either side is not replaced by rename(2): the caller's checks allowed it to go.
    const outIsDir = await lstat(out).then(
      (st) => st.isDirectory(),
      () => false,
    );
    if (outIsDir || (await stat(tmp)).isDirectory()) await rm(out, { recursive: true, force: true });
    await rename(tmp, out);
    return result;
  } catch (err) {
    await rm(tmp, { recursive: true, force: true });
    throw err;
  }
}

/** Names the output's directory when it is missing (the temp file's ENOENT would say nothing useful). */
export async function checkOutputDir(out: string): Promise<void> {
  const dir = dirname(out);
  const st = await stat(dir).catch((err: NodeJS.ErrnoException) => {
    if (err.code === "ENOENT") {
      throw new KilnError("NOT_FOUND", `cannot write ${out}: directory ${dir} does not exist`);
    }
    throw err;
  });
  if (!st.isDirectory()) {
    throw new KilnError("INVALID_ARGUMENT", `cannot write ${out}: ${dir} is not a directory`);
  }
}
