/**
 * The in-memory tree every writer (ext4, EROFS, cpio) takes: metadata only. A regular file's bytes
 * stay in its layer; the inode holds a reference (layer, offset in the uncompressed tar stream), and
 * writers read the bytes through a ContentSource in one sequential pass per layer.
 *
 * Hardlinks are one Inode object under several names. Names and symlink targets are byte strings
 * (src/io/bytestring.ts): Linux names are bytes, not text, so the writers store exactly the bytes of
 * the tar, and names sort by those bytes everywhere, so output is reproducible.
 */
import { KilnError } from "../errors.js";

export type FileType = "file" | "directory" | "symlink" | "char" | "block" | "fifo" | "socket";

/** The S_IFMT bits of each type, as stat(2), ext4, EROFS and cpio all spell them in i_mode. */
export const TYPE_MODE_BITS: Readonly<Record<FileType, number>> = {
  file: 0o100000,
  directory: 0o040000,
  symlink: 0o120000,
  char: 0o020000,
  block: 0o060000,
  fifo: 0o010000,
  socket: 0o140000,
};

/** i_mode: type bits and permission bits (with setuid/setgid/sticky). */
export function modeWord(type: FileType, perm: number): number {
  return TYPE_MODE_BITS[type] | (perm & 0o7777);
}

/** One region of a sparse file: `size` bytes of data at logical `offset` (the rest reads as zeros). */
export interface Extent {
  readonly offset: number;
  readonly size: number;
}

/** Where a regular file's stored bytes are: a span of one layer's uncompressed tar stream. */
export interface DataRef {
  /** Layer index, bottom = 0. */
  readonly layer: number;
  /** Byte offset of the entry's data in the uncompressed layer stream. */
  readonly offset: number;
  /** Bytes stored in the archive for this entry (less than the file size when sparse). */
  readonly stored: number;
  /** Sparse files: the data regions (ascending, disjoint), in the order their bytes are stored. */
  readonly sparse?: readonly Extent[] | undefined;
}

export interface Inode {
  type: FileType;
  /** Permission bits with setuid/setgid/sticky (mode & 0o7777); the type is `type`. */
  mode: number;
  uid: number;
  gid: number;
  /** Modification time, seconds and nanoseconds; writers use it for atime/ctime too. */
  mtime: number;
  mtimeNsec: number;
  /** Logical size: a file's bytes, a symlink target's length in bytes, 0 otherwise. */
  size: number;
  /** Symlink target, a byte string as written (absolute targets stay absolute). */
  target: string;
  /** Device numbers of char and block devices. */
  rdevMajor: number;
  rdevMinor: number;
  /** Extended attributes: name → raw value bytes. */
  xattrs: Map<string, Buffer>;
  /** Regular files with size > 0. */
  data: DataRef | undefined;
  /** Directories: name → inode (a name is one path component, never "", "." or ".."). */
  entries: Map<string, Inode> | undefined;
}

/** Largest uid or gid: ext4, EROFS and cpio all store ids in 32 bits. */
export const MAX_ID = 0xffffffff;

/**
 * Refuses an owner no writer can store, naming the entry (`where`, e.g. `/usr/bin/x`): truncated, a
 * uid of 2^32 would come out as root.
 */
export function checkOwner(inode: Inode, where: string): void {
  const fits = (id: number) => Number.isInteger(id) && id >= 0 && id <= MAX_ID;
  if (!fits(inode.uid) || !fits(inode.gid)) {
    throw new KilnError(
      "UNSUPPORTED_ARCHIVE",
      `owner ${inode.uid}:${inode.gid} of ${where} is out of range (ids go up to ${MAX_ID})`,
    );
  }
}

/**
 * The xattrs of every inode that has none. Inodes may share an xattr map: give an inode a new map
 * rather than modifying the one it has.
 */
export const NO_XATTRS: Map<string, Buffer> = new (class extends Map<string, Buffer> {
  override set(): this {
    throw new Error("NO_XATTRS is shared: give the inode a new map");
  }
  override delete(): boolean {
    throw new Error("NO_XATTRS is shared: give the inode a new map");
  }
})();

/**
 * An inode from its attributes, positionally: no options object, for the per-entry paths. newInode
 * builds on it, so every inode has the one shape.
 */
export function inodeOf(
  type: FileType,
  mode: number,
  uid: number,
  gid: number,
  mtime: number,
  mtimeNsec: number,
  xattrs: Map<string, Buffer>,
): Inode {
  return {
    type,
    mode,
    uid,
    gid,
    mtime,
    mtimeNsec,
    size: 0,
    target: "",
    rdevMajor: 0,
    rdevMinor: 0,
    xattrs,
    data: undefined,
    entries: type === "directory" ? new Map() : undefined,
  };
}

export function newInode(type: FileType, fields: Partial<Omit<Inode, "type">> = {}): Inode {
  const inode = inodeOf(
    type,
    fields.mode ?? (type === "directory" ? 0o755 : 0o644),
    fields.uid ?? 0,
    fields.gid ?? 0,
    fields.mtime ?? 0,
    fields.mtimeNsec ?? 0,
    fields.xattrs ?? NO_XATTRS,
  );
  inode.size = fields.size ?? 0;
  inode.target = fields.target ?? "";
  inode.rdevMajor = fields.rdevMajor ?? 0;
  inode.rdevMinor = fields.rdevMinor ?? 0;
  inode.data = fields.data;
  if (type === "directory" && fields.entries) inode.entries = fields.entries;
  return inode;
}

/** Byte order of names (byte strings): the order on-disk directories and reproducible walks use. */
export function compareNames(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}

export interface WalkItem {
  /** Path from the root, "" for the root itself, no leading slash: `etc/passwd`. */
  readonly path: string;
  readonly name: string;
  readonly inode: Inode;
  readonly parent: Inode | undefined;
  /** True the first time this inode is met (later names are hardlinks to it). */
  readonly first: boolean;
}

/** A directory's names in byte order (no [name, inode] pair per entry). */
export function sortedNames(dir: Inode): string[] {
  return dir.entries ? [...dir.entries.keys()].sort(compareNames) : [];
}

/**
 * Depth-first, parents before children, names in byte order: the same order on every run.
 * Iterative, with one frame per open directory: nested generators would pass every item up
 * through each level above it.
 */
export function* walk(root: Inode): Generator<WalkItem> {
  const seen = new Set<Inode>([root]);
  yield { path: "", name: "", inode: root, parent: undefined, first: true };
  if (root.type !== "directory") return;
  const stack = [{ path: "", dir: root, names: sortedNames(root), next: 0 }];
  while (stack.length > 0) {
    const top = stack[stack.length - 1]!;
    if (top.next === top.names.length) {
      stack.pop();
      continue;
    }
    const name = top.names[top.next++]!;
    const inode = top.dir.entries!.get(name)!;
    const path = top.path === "" ? name : `${top.path}/${name}`;
    const first = !seen.has(inode);
    if (first) seen.add(inode);
    yield { path, name, inode, parent: top.dir, first };
    if (first && inode.type === "directory")
      stack.push({ path, dir: inode, names: sortedNames(inode), next: 0 });
  }
}

/** Link counts as filesystems define them: names for non-directories, 2 + subdirectories for directories. */
export function linkCounts(root: Inode): Map<Inode, number> {
  const counts = new Map<Inode, number>();
  for (const item of walk(root)) {
    if (item.inode.type === "directory") {
      if (item.first)
        counts.set(
          item.inode,
          2 + [...item.inode.entries!.values()].filter((c) => c.type === "directory").length,
        );
    } else {
      counts.set(item.inode, (counts.get(item.inode) ?? 0) + 1);
    }
  }
  return counts;
}

/**
 * Regular files with data, each once, in the order their bytes can be read: by layer, then by
 * offset in the layer. Writers lay data out in this order and read it through a ContentSource.
 */
export function dataOrder(root: Inode): Inode[] {
  const files: Inode[] = [];
  for (const item of walk(root))
    if (item.first && item.inode.type === "file" && item.inode.data) files.push(item.inode);
  return sortDataOrder(files);
}

/** Sorts regular files with data (each once) into dataOrder, in place, for a writer that walked already. */
export function sortDataOrder(files: Inode[]): Inode[] {
  return files.sort((a, b) => a.data!.layer - b.data!.layer || a.data!.offset - b.data!.offset);
}

export interface ContentOptions {
  /** The consumer is done with a chunk once it asks for the next one (see ContentSource). */
  readonly transient?: boolean | undefined;
}

/** The bytes of regular files, delivered in dataOrder. */
export interface ContentSource {
  /**
   * Yields each file's stored bytes: its content (exactly `inode.size` bytes), or for a sparse file
   * (`data.sparse`) its data regions back to back, never its holes (sparse.ts places them), in the
   * order given, which must be dataOrder's. Each `data` must be consumed before the next item.
   * A chunk, once yielded, belongs to the consumer (it may be kept, batched): never reuse its memory,
   * unless the consumer says `transient`: it copies what it keeps before asking for the next chunk,
   * so the source may read the next ones into the same memory.
   */
  contents(
    files: readonly Inode[],
    opts?: ContentOptions,
  ): AsyncIterable<{ inode: Inode; data: AsyncIterable<Buffer> }>;
}

/** A ContentSource over buffers in memory (a sparse file's given whole), for tests and tiny trees. */
export class MemoryContent implements ContentSource {
  readonly #bytes = new Map<Inode, Buffer>();

  set(inode: Inode, bytes: Buffer): void {
    this.#bytes.set(inode, bytes);
  }

  async *contents(files: readonly Inode[]): AsyncIterable<{ inode: Inode; data: AsyncIterable<Buffer> }> {
    for (const inode of files) {
      const logical = this.#bytes.get(inode) ?? Buffer.alloc(inode.size);
      const regions = inode.data?.sparse;
      const bytes = regions
        ? Buffer.concat(regions.map((r) => logical.subarray(r.offset, r.offset + r.size)))
        : logical;
      yield {
        inode,
        data: (async function* () {
          // Chunks of at most 64 KiB, as a stream would deliver them.
          for (let i = 0; i < bytes.length; i += 65536) yield bytes.subarray(i, i + 65536);
        })(),
      };
    }
  }
}
