import { createHash } from "node:crypto";
import { chmod, link, lutimes, mkdir, open, readFile, symlink, truncate, writeFile } from "node:fs/promises";
import { dirname, join } from "node:path";
import { makeTempDir, removeDir, run } from "./exec.js";

/** One tar entry. Entries go into the tar in the order given; parents not listed stay out of it. */
export interface EntrySpec {
  /** Path inside the image, e.g. `etc/passwd` (a leading `/` is dropped; `./x` stays as written). */
  path: string;
  /** Default "file" ("dir" when the path ends with `/`). Devices need root (mknod). */
  type?: "file" | "dir" | "symlink" | "hardlink" | "fifo" | "chardev" | "blockdev";
  /** File content; or `size` bytes of deterministic pseudo-random data (so gzip cannot shrink it). */
  content?: string | Buffer;
  size?: number;
  /** Symlink target (as written), or the path of the earlier entry a hardlink names. */
  target?: string;
  /** Permission bits incl. setuid/setgid/sticky; default 0o644 files, 0o755 dirs. */
  mode?: number;
  uid?: number;
  gid?: number;
  /** Seconds since the epoch; default 2024-01-01T00:00:00Z. */
  mtime?: number;
  /** Extended attributes (stored as PAX SCHILY.xattr.*); `security.*`/`trusted.*` need root. */
  xattrs?: Record<string, string | Buffer>;
  major?: number;
  minor?: number;
}

export const DEFAULT_MTIME = 1704067200;

const TAR_FLAGS = [
  "--format=pax",
  "--xattrs",
  "--xattrs-include=*",
  "--numeric-owner",
  "--no-recursion",
  // Reproducible: no atime/ctime records, no PID in PAX header names.
  "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime",
];

/**
 * Writes `entries` as a layer tar with GNU tar, an independent, real-world tar writer. Owners are
 * set with --owner/--group (no root needed), one tar run per stretch of entries sharing an owner;
 * a hardlink therefore must follow its target with no entry of another owner between them.
 * `endBlocks: false` cuts the end-of-archive zero blocks off, as umoci insert 0.4.7 does.
 */
export async function writeLayerTar(
  file: string,
  entries: readonly EntrySpec[],
  opts: { endBlocks?: boolean } = {},
): Promise<void> {
  const stage = await makeTempDir("layer");
  try {
    const names = await stageEntries(stage, entries);
    const owners = entries.map((e, i) => ownerOf(entries, i, e));
    // One tar run per owner stretch, each its own archive, then concatenated without their end
    // blocks: `tar --append` would write later stretches in the format of the archive's last
    // member (plain ustar when it had no PAX header), silently dropping xattrs and long names.
    const parts: string[] = [];
    let start = 0;
    for (let i = 1; i <= entries.length; i++) {
      if (i < entries.length && owners[i] === owners[start]) continue;
      const [uid, gid] = owners[start]!.split(":");
      const list = join(stage, `.list-${start}`);
      const part = join(stage, `.part-${start}.tar`);
      await writeFile(list, `${names.slice(start, i).join("\0")}\0`);
      await run("tar", [
        "--create",
        "-f",
        part,
        ...TAR_FLAGS,
        `--owner=${uid}`,
        `--group=${gid}`,
        "-C",
        join(stage, "root"),
        "--null",
        "--verbatim-files-from",
        "-T",
        list,
      ]);
      await stripEndBlocks(part);
      parts.push(part);
      start = i;
    }
    const chunks = await Promise.all(parts.map((p) => readFile(p)));
    await writeFile(file, Buffer.concat([...chunks, Buffer.alloc(1024)]));
  } finally {
    await removeDir(stage);
  }
  if (opts.endBlocks === false) await stripEndBlocks(file);
}

function ownerOf(entries: readonly EntrySpec[], i: number, e: EntrySpec): string {
  if (e.type === "hardlink") {
    const t = entries.findIndex((x, j) => j < i && clean(x.path) === clean(e.target ?? ""));
    if (t < 0) throw new Error(`hardlink ${e.path}: target ${e.target} is not an earlier entry`);
    for (let j = t + 1; j < i; j++) {
      if (ownerOf(entries, j, entries[j]!) !== ownerOf(entries, t, entries[t]!)) {
        throw new Error(`hardlink ${e.path}: an entry of another owner separates it from ${e.target}`);
      }
    }
    return ownerOf(entries, t, entries[t]!);
  }
  return `${e.uid ?? 0}:${e.gid ?? 0}`;
}

function clean(p: string): string {
  return p.replace(/^\/+/, "").replace(/\/+$/, "");
}

/** Creates the entries under stage/root; returns the names to hand to tar, in order. */
async function stageEntries(stage: string, entries: readonly EntrySpec[]): Promise<string[]> {
  const root = join(stage, "root");
  await mkdir(root);
  const names: string[] = [];
  const seen = new Set<string>();
  for (const e of entries) {
    const name = clean(e.path);
    if (name === "" || seen.has(name)) throw new Error(`layer entry "${e.path}": empty or repeated path`);
    seen.add(name);
    names.push(name);
    const p = join(root, name);
    await mkdir(dirname(p), { recursive: true });
    const type = e.type ?? (e.path.endsWith("/") ? "dir" : "file");
    switch (type) {
      case "file":
        if (e.size !== undefined) await writeNoise(p, e.size, name);
        else await writeFile(p, e.content ?? "");
        break;
      case "dir":
        await mkdir(p, { recursive: true });
        break;
      case "symlink":
        await symlink(required(e, "target"), p);
        break;
      case "hardlink":
        await link(join(root, clean(required(e, "target"))), p);
        break;
      case "fifo":
        await run("mkfifo", [p]);
        break;
      case "chardev":
      case "blockdev":
        await run("mknod", [p, type === "chardev" ? "c" : "b", String(e.major ?? 0), String(e.minor ?? 0)]);
        break;
    }
    for (const [k, v] of Object.entries(e.xattrs ?? {})) {
      const hex = `0x${Buffer.from(v).toString("hex")}`;
      await run("setfattr", [...(type === "symlink" ? ["-h"] : []), "-n", k, "-v", hex, p]);
    }
  }
  // Modes and times last, deepest first: a read-only directory must not block its children,
  // and creating a child must not touch its parent's mtime afterwards.
  for (let i = entries.length - 1; i >= 0; i--) {
    const e = entries[i]!;
    const type = e.type ?? (e.path.endsWith("/") ? "dir" : "file");
    const p = join(root, names[i]!);
    if (type !== "symlink" && type !== "hardlink") await chmod(p, e.mode ?? (type === "dir" ? 0o755 : 0o644));
    if (type !== "hardlink") await lutimes(p, e.mtime ?? DEFAULT_MTIME, e.mtime ?? DEFAULT_MTIME);
  }
  return names;
}

function required(e: EntrySpec, key: "target"): string {
  const v = e[key];
  if (v === undefined) throw new Error(`layer entry "${e.path}" (${e.type}) needs "${key}"`);
  return v;
}

/** `size` bytes of SHA-256 counter-mode output seeded by `seed`: incompressible, reproducible. */
async function writeNoise(path: string, size: number, seed: string): Promise<void> {
  const fh = await open(path, "w");
  try {
    const chunk = Buffer.alloc(Math.min(size, 1 << 20));
    let counter = 0;
    for (let done = 0; done < size; ) {
      for (let off = 0; off < chunk.length; off += 32) {
        createHash("sha256").update(`${seed}:${counter++}`).digest().copy(chunk, off);
      }
      const n = Math.min(chunk.length, size - done);
      await fh.write(chunk, 0, n);
      done += n;
    }
  } finally {
    await fh.close();
  }
}

/**
 * Cuts a tar right after its last entry's data: no end-of-archive blocks, no record padding.
 * Walks the headers (sizes from the header, octal or base-256) so zero data blocks are kept.
 */
export async function stripEndBlocks(file: string): Promise<void> {
  const fh = await open(file, "r");
  let end = 0;
  try {
    const { size: total } = await fh.stat();
    const header = Buffer.alloc(512);
    while (end + 512 <= total) {
      await fh.read(header, 0, 512, end);
      if (header.every((b) => b === 0)) break;
      end += 512 + Math.ceil(entrySize(header) / 512) * 512;
    }
  } finally {
    await fh.close();
  }
  await truncate(file, end);
}

function entrySize(header: Buffer): number {
  const field = header.subarray(124, 136);
  if (field[0]! & 0x80) {
    let n = 0;
    for (let i = 1; i < field.length; i++) n = n * 256 + field[i]!;
    return n;
  }
  const text = field.toString("latin1").replace(/\0.*$/s, "").trim();
  return text === "" ? 0 : Number.parseInt(text, 8);
}
