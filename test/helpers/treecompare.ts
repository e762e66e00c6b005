/**
 * A canonical description of a directory tree on the host (a mounted image, an extracted archive,
 * `umoci unpack`'s rootfs), entry by entry, and a diff of two: how export tests prove an output
 * equals the reference. Reads with lstat (never follows symlinks) and getfattr (raw hex values).
 */
import { createHash } from "node:crypto";
import { createReadStream } from "node:fs";
import { lstat, readdir, readlink } from "node:fs/promises";
import { join } from "node:path";
import { run } from "./exec.js";

export interface EntryFacts {
  type: "file" | "dir" | "symlink" | "char" | "block" | "fifo" | "socket";
  /** Permission bits with setuid/setgid/sticky. */
  mode: number;
  uid: number;
  gid: number;
  /** Files only (directory sizes are filesystem-specific). */
  size?: number;
  sha256?: string;
  target?: string;
  /** Devices: "major:minor". */
  rdev?: string;
  /** Non-directories with more than one name: every name of the inode, sorted. */
  links?: string[];
  /** name → hex value. */
  xattrs: Record<string, string>;
  mtime?: number;
}

export interface SnapshotOptions {
  /** Compare mtimes (seconds). Default false. */
  mtime?: boolean;
  /** Paths (relative, no leading slash) to leave out, e.g. "lost+found". */
  ignore?: string[];
  /** xattr names to leave out (e.g. "security.selinux" a host adds). */
  ignoreXattrs?: string[];
}

function typeOf(mode: number): EntryFacts["type"] {
  switch (mode & 0o170000) {
    case 0o100000:
      return "file";
    case 0o040000:
      return "dir";
    case 0o120000:
      return "symlink";
    case 0o020000:
      return "char";
    case 0o060000:
      return "block";
    case 0o010000:
      return "fifo";
    default:
      return "socket";
  }
}

async function sha256File(path: string): Promise<string> {
  const h = createHash("sha256");
  for await (const chunk of createReadStream(path)) h.update(chunk as Buffer);
  return h.digest("hex");
}

/** `getfattr -R -d -m - -e hex -h` over the tree, parsed: path → {name: hex}. */
async function allXattrs(root: string): Promise<Map<string, Record<string, string>>> {
  const out = await run("getfattr", [
    "-R",
    "-d",
    "-m",
    "-",
    "-e",
    "hex",
    "-h",
    "--absolute-names",
    root,
  ]).catch((err: Error) => {
    // getfattr exits non-zero when a file has no xattrs support; an empty answer is fine then.
    if (/Operation not supported/.test(err.message)) return "";
    throw err;
  });
  const result = new Map<string, Record<string, string>>();
  let current: Record<string, string> | undefined;
  for (const line of out.split("\n")) {
    if (line.startsWith("# file: ")) {
      const abs = line.slice("# file: ".length);
      const rel = abs === root ? "" : abs.slice(root.length + 1);
      current = {};
      result.set(rel, current);
    } else if (current && line.includes("=")) {
      const eq = line.indexOf("=");
      current[line.slice(0, eq)] = line.slice(eq + 1);
    }
  }
  return result;
}

/** Describes every entry below `root` (the root itself as ""). */
export async function snapshotTree(
  root: string,
  opts: SnapshotOptions = {},
): Promise<Map<string, EntryFacts>> {
  const facts = new Map<string, EntryFacts>();
  const inodes = new Map<bigint, string[]>();
  const ignore = new Set(opts.ignore ?? []);
  const xattrs = await allXattrs(root);
  const visit = async (rel: string): Promise<void> => {
    const abs = rel === "" ? root : join(root, rel);
    const st = await lstat(abs, { bigint: true });
    const type = typeOf(Number(st.mode));
    const f: EntryFacts = {
      type,
      mode: Number(st.mode) & 0o7777,
      uid: Number(st.uid),
      gid: Number(st.gid),
      xattrs: Object.fromEntries(
        Object.entries(xattrs.get(rel) ?? {}).filter(([k]) => !(opts.ignoreXattrs ?? []).includes(k)),
      ),
    };
    if (opts.mtime && type !== "symlink") f.mtime = Number(st.mtimeMs / 1000n);
    if (type === "file") {
      f.size = Number(st.size);
      f.sha256 = await sha256File(abs);
    } else if (type === "symlink") {
      f.target = await readlink(abs);
    } else if (type === "char" || type === "block") {
      const rdev = Number(st.rdev);
      // glibc's major()/minor() split of a dev_t.
      const major = ((rdev >>> 8) & 0xfff) | (Math.floor(rdev / 2 ** 32) & ~0xfff);
      const minor = (rdev & 0xff) | ((rdev >>> 12) & ~0xff);
      f.rdev = `${major}:${minor}`;
    }
    if (type !== "dir" && st.nlink > 1n) inodes.set(st.ino, [...(inodes.get(st.ino) ?? []), rel]);
    facts.set(rel, f);
    if (type === "dir") {
      for (const name of (await readdir(abs)).sort()) {
        const child = rel === "" ? name : `${rel}/${name}`;
        if (!ignore.has(child)) await visit(child);
      }
    }
  };
  await visit("");
  for (const names of inodes.values()) {
    const sorted = [...names].sort();
    for (const n of sorted) facts.get(n)!.links = sorted;
  }
  return facts;
}

/** Human-readable differences between two snapshots; empty when they are equal. */
export function diffTrees(
  expected: Map<string, EntryFacts>,
  actual: Map<string, EntryFacts>,
  labels: [string, string] = ["expected", "actual"],
): string[] {
  const out: string[] = [];
  for (const [path, e] of expected) {
    const a = actual.get(path);
    if (!a) {
      out.push(`/${path}: only in ${labels[0]}`);
      continue;
    }
    for (const key of new Set([...Object.keys(e), ...Object.keys(a)]) as Set<keyof EntryFacts>) {
      const ev = JSON.stringify(e[key]);
      const av = JSON.stringify(a[key]);
      if (ev !== av) out.push(`/${path}: ${key} ${labels[0]}=${ev} ${labels[1]}=${av}`);
    }
  }
  for (const path of actual.keys()) if (!expected.has(path)) out.push(`/${path}: only in ${labels[1]}`);
  return out;
}
