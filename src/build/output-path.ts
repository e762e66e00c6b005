/**
 * What an output path the user named may become. The path is the user's: a symlink is followed to
 * its target (never replaced), a block device is written in place (never replaced), and nothing
 * that holds data is replaced without `force`. Checked before any work, so a refusal costs nothing.
 */
import type { Stats } from "node:fs";
import { lstat, readdir, readlink, realpath, stat } from "node:fs/promises";
import { dirname, resolve } from "node:path";
import { KilnError } from "../errors.js";
import { checkDeviceFree } from "./block-device.js";
import { checkOutputDir } from "./publish.js";

/** A format's result: one file (ext4, erofs, cpio) or a directory of files (erofs-layers). */
export type OutputShape = "file" | "directory";

export interface OutputRules {
  shape: OutputShape;
  /** Replace what the rules would refuse (a directory, a file in place of a directory, a disk). */
  force?: boolean | undefined;
  /** Refuse an existing non-empty file too (an empty disk must not wipe one). */
  keepFiles?: boolean | undefined;
  /** Write a block device in place; when false, one is refused. */
  devices?: boolean | undefined;
}

/** Where to write: a path to publish atomically, or a block device to write in place. */
export interface OutputTarget {
  /** The path written: a symlink's target (absolute), or the path itself. */
  path: string;
  /** A block device, written in place: no temp file, no rename, no truncate. */
  device: boolean;
}

/** Linux's limit on symlinks followed in one lookup. */
const MAX_LINKS = 40;

/** Applies the rules to `out`, following symlinks; throws a KilnError naming what was refused. */
export async function checkOutput(out: string, rules: OutputRules): Promise<OutputTarget> {
  const st = await stat(out).catch((err: NodeJS.ErrnoException) => {
    if (err.code === "ENOENT" || err.code === "ENOTDIR") return undefined;
    if (err.code === "ELOOP") {
      throw new KilnError("INVALID_ARGUMENT", `cannot write ${out}: too many levels of symbolic links`);
    }
    throw err;
  });
  if (st === undefined) {
    // Missing, or a dangling symlink: the file is created where the last link points.
    const path = await danglingTarget(resolve(out));
    await checkOutputDir(path);
    return { path, device: false };
  }
  const refuse = (what: string, hint: string) =>
    new KilnError("INVALID_ARGUMENT", `cannot write ${out}: ${what}${hint ? ` (${hint})` : ""}`);
  const force = rules.force === true;
  if (st.isBlockDevice()) {
    if (rules.shape === "directory") throw refuse("it is a block device", "erofs-layers writes a directory");
    if (rules.devices === false) throw refuse("it is a block device", "give a file path");
    const path = await realpath(out);
    await checkDeviceFree(path);
    return { path, device: true };
  }
  const special = specialKind(st);
  if (special) throw refuse(`it is a ${special}`, "kiln writes a file, a directory or a block device");
  if (st.isDirectory()) {
    if (rules.shape === "file" && !force) throw refuse("it is a directory", "--force replaces it");
    if (rules.shape === "directory" && !force && (await readdir(out)).length > 0) {
      throw refuse("the directory is not empty", "--force replaces it");
    }
  } else if (!force) {
    if (rules.shape === "directory") throw refuse("it is a file", "--force replaces it");
    if (rules.keepFiles && st.size > 0)
      throw refuse("the file exists and is not empty", "--force replaces it");
  }
  const path = await realpath(out);
  // Replacing it would remove everything on the filesystem first.
  if (force && st.isDirectory() && dirname(path) === path) throw refuse("it is the filesystem root", "");
  return { path, device: false };
}

function specialKind(st: Stats): string | undefined {
  if (st.isCharacterDevice()) return "character device";
  if (st.isFIFO()) return "FIFO";
  if (st.isSocket()) return "socket";
  return undefined;
}

/** The path a missing `path` names once its symlinks (if any) are followed: where to create it. */
async function danglingTarget(path: string): Promise<string> {
  let p = path;
  for (let i = 0; i < MAX_LINKS; i++) {
    const st = await lstat(p).catch(() => undefined);
    if (!st?.isSymbolicLink()) return p;
    p = resolve(dirname(p), await readlink(p));
  }
  throw new KilnError("INVALID_ARGUMENT", `cannot write ${path}: too many levels of symbolic links`);
}
