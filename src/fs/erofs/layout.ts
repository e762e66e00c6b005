/**
 * Where everything of an EROFS image goes, computed from the tree alone before any byte is
 * written (every size is known from the metadata):
 *
 *   block 0                superblock
 *   blocks 1..            regular files' full blocks, in dataOrder (so they stream in one pass);
 *                          a sparse file's stored chunks only (chunk-based: chunks.ts)
 *   then                   full blocks of directories and symlinks too big to inline
 *   meta_blkaddr..end      the metadata area: per inode, on 32-byte slots, the inode, its inline
 *                          xattrs, and its inline tail (last partial block of a file, directory or
 *                          symlink) or a sparse file's block map, the whole kept inside one block
 *                          as the kernel requires when it fits one (a block map may span several). The
 *                          root and every inode without file data first (walk order), then regular
 *                          files with data in dataOrder: their slots, tails included, are written
 *                          as a second stream beside their blocks, in the one pass over the layers.
 *
 * Slot 0 of the metadata area stays empty: the kernel reports nid as the inode number, and a
 * root with inode number 0 hides "." and ".." from readdir users that skip d_ino 0.
 */
import { KilnError } from "../../errors.js";
import { quoteBytes, showBytes, toBytes } from "../../io/bytestring.js";
import { checkOwner, compareNames, type Inode, sortDataOrder } from "../tree.js";
import { type ChunkPlan, planChunks } from "./chunks.js";
import { type DirEntry, type DirPlan, planDirBlocks } from "./dirent.js";
import {
  BLOCK_MAP_ENTRY,
  CHUNK_BASED,
  COMPACT_SIZE,
  DIRENT_TYPE,
  EXTENDED_SIZE,
  encodeRdev,
  FLAT_INLINE,
  FLAT_PLAIN,
  fitsCompact,
  NULL_ADDR,
  SLOT_SIZE,
} from "./inode.js";
import { BLOCK_SIZE } from "./superblock.js";
import { encodeXattrs, NO_XATTRS_IBODY } from "./xattr.js";

/** Linux symlink targets are shorter than PATH_MAX (4096 with the NUL). */
const MAX_SYMLINK = 4095;
const MAX_NAME = 255;

export interface Node {
  inode: Inode;
  /** Where the inode was first met (its path, for messages: pathOf): the parent's node and the name. */
  parent: Node | undefined;
  name: string;
  ino: number;
  nlink: number;
  extended: boolean;
  /** Encoded inline xattrs (empty when none). */
  xattrs: Buffer;
  layout: number;
  /** i_size. */
  size: number;
  /** Full blocks at blkaddr (the tail excluded when inline). */
  blocks: number;
  /** raw_blkaddr, or the encoded rdev of a device. */
  u: number;
  /** Bytes of the last partial block stored in the slot after the xattrs (0 when not inline). */
  tail: number;
  /** Byte offset of the slot in the metadata area; nid = offset / 32. */
  offset: number;
  /** Directories: entries with "." and "..", sorted by name bytes, and their block split. */
  dir: { entries: DirRef[]; plan: DirPlan } | undefined;
  /** Symlinks: the target bytes. */
  target: Buffer | undefined;
  /** Sparse files: chunk-based, their stored chunks (`blocks` of them) and block map (chunks.ts). */
  chunks: ChunkPlan | undefined;
}

/** A dirent with the inode it names (its nid is known once slots are placed). */
export interface DirRef extends DirEntry {
  ref: Inode;
  /** False for "." and "..". */
  child: boolean;
}

/**
 * The first path of a node's inode, from the root ("" for the root itself), or of `child` in it:
 * built when a message needs it, not kept per inode (tens of thousands of strings for the write).
 */
export function pathOf(node: Node | undefined, child?: string): string {
  const names = child === undefined ? [] : [child];
  for (let n = node; n?.parent; n = n.parent) names.push(n.name);
  return showBytes(names.reverse().join("/"));
}

export interface Layout {
  /** Every inode once, in walk order (the root first). */
  nodes: Node[];
  byInode: Map<Inode, Node>;
  /** Regular files with data, in the order their bytes arrive; their slots follow in that order. */
  files: Inode[];
  /** Byte offset in the metadata area where the files' slots begin (metaBytes when there are none). */
  filesOffset: number;
  buildTime: number;
  buildTimeNsec: number;
  metaBlkaddr: number;
  /** Bytes of the metadata area, a whole number of blocks. */
  metaBytes: number;
  totalBlocks: number;
  /** Some inode is chunk-based (a superblock feature). */
  chunked: boolean;
}

export interface LayoutOptions {
  buildTime?: number | undefined;
  /** Store the last partial block of regular files after their inode (default true). */
  inlineData?: boolean | undefined;
}

const slotOf = (n: Node): number => n.offset / SLOT_SIZE;
export const nidOf = slotOf;
export const inodeSize = (n: Node): number => (n.extended ? EXTENDED_SIZE : COMPACT_SIZE);
/** Bytes of a node's slot: inode, xattrs, and its inline tail or its block map (4-byte aligned already). */
export const slotSize = (n: Node): number =>
  inodeSize(n) + n.xattrs.length + n.tail + (n.chunks ? n.chunks.count * BLOCK_MAP_ENTRY : 0);

/** A directory entry's name's length as stored; `dir` is the parent's node, for the message. */
function checkName(name: string, dir: Node): number {
  const bytes = name.length; // a byte string: one character a byte
  if (bytes === 0 || bytes > MAX_NAME || name === "." || name === ".." || /[/\0]/.test(name))
    throw new KilnError(
      "INVALID_ARGUMENT",
      `name ${quoteBytes(name)} in /${pathOf(dir)} cannot be stored in EROFS (1-255 bytes, no / or NUL)`,
    );
  return bytes;
}

/** The most common (mtime, nsec) of the tree, so as many inodes as possible can be compact. */
function commonTime(inodes: readonly Inode[]): [number, number] {
  const counts = new Map<string, { t: [number, number]; n: number }>();
  for (const i of inodes) {
    if (i.mtime < 0) continue; // build_time is unsigned
    const key = `${i.mtime}.${i.mtimeNsec}`;
    const c = counts.get(key);
    if (c) c.n++;
    else counts.set(key, { t: [i.mtime, i.mtimeNsec], n: 1 });
  }
  let best: { t: [number, number]; n: number } | undefined;
  for (const c of counts.values()) {
    if (
      !best ||
      c.n > best.n ||
      (c.n === best.n && (c.t[0] < best.t[0] || (c.t[0] === best.t[0] && c.t[1] < best.t[1])))
    )
      best = c;
  }
  return best?.t ?? [0, 0];
}

interface Visit {
  nodes: Node[];
  byInode: Map<Inode, Node>;
  /** Regular files with data, each once, in walk order. */
  files: Inode[];
  /** Directories: their dirents, sorted by name bytes. */
  children: Map<Inode, DirRef[]>;
}

/**
 * One depth-first pass, parents first, names in byte order (tree.ts `walk` order), sorting each
 * directory once: walk() compares names by re-encoding them, too slow for 100k-entry trees.
 */
function visitTree(root: Inode): Visit {
  const v: Visit = { nodes: [], byInode: new Map(), files: [], children: new Map() };
  const visit = (name: string, inode: Inode, parent: Inode, parentNode: Node | undefined): void => {
    const seen = v.byInode.get(inode);
    if (seen) {
      if (inode.type === "directory")
        throw new KilnError(
          "INVALID_ARGUMENT",
          `directory /${pathOf(parentNode, name)} has a second name (hardlinked directory)`,
        );
      seen.nlink++;
      return;
    }
    const node: Node = {
      inode,
      parent: parentNode,
      name,
      ino: v.nodes.length + 1,
      nlink: 1,
      extended: false,
      xattrs: NO_XATTRS_IBODY,
      layout: FLAT_PLAIN,
      size: 0,
      blocks: 0,
      u: 0,
      tail: 0,
      offset: 0,
      // Present on every node, so all nodes share one shape (property reads stay monomorphic).
      dir: undefined,
      target: undefined,
      chunks: undefined,
    };
    // Only with xattrs: the message string would otherwise be built for every inode.
    if (inode.xattrs.size > 0) node.xattrs = encodeXattrs(inode.xattrs, `/${pathOf(node)}`);
    v.nodes.push(node);
    v.byInode.set(inode, node);
    if (inode.type === "file" && inode.data) v.files.push(inode);
    if (inode.type !== "directory") return;
    // Dirents, "." and ".." included: they sort among the names ("-x" comes before them).
    const entries: DirRef[] = [
      { name: ".", bytes: 1, type: DIRENT_TYPE.directory, nid: 0, ref: inode, child: false },
      { name: "..", bytes: 2, type: DIRENT_TYPE.directory, nid: 0, ref: parent, child: false },
    ];
    let subdirs = 0;
    for (const [name, child] of inode.entries!) {
      entries.push({
        name,
        bytes: checkName(name, node),
        type: DIRENT_TYPE[child.type],
        nid: 0,
        ref: child,
        child: true,
      });
      if (child.type === "directory") subdirs++;
    }
    entries.sort((a, b) => compareNames(a.name, b.name));
    v.children.set(inode, entries);
    node.nlink = 2 + subdirs;
    for (const e of entries) if (e.child) visit(e.name, e.ref, inode, node);
  };
  visit("", root, root, undefined);
  return v;
}

export function planLayout(root: Inode, opts: LayoutOptions = {}): Layout {
  if (root.type !== "directory")
    throw new KilnError("INVALID_ARGUMENT", "the root of an EROFS image must be a directory");
  const inlineData = opts.inlineData ?? true;
  if (opts.buildTime !== undefined && !(Number.isSafeInteger(opts.buildTime) && opts.buildTime >= 0))
    throw new KilnError(
      "INVALID_ARGUMENT",
      `EROFS build time ${opts.buildTime} is not a non-negative integer`,
    );
  const { nodes, byInode, files, children } = visitTree(root);
  sortDataOrder(files);

  const [buildTime, buildTimeNsec] =
    opts.buildTime === undefined ? commonTime(nodes.map((n) => n.inode)) : [opts.buildTime, 0];

  for (const node of nodes) {
    const { inode } = node;
    let inlineAllowed = true;
    switch (inode.type) {
      case "file":
        node.size = inode.size;
        inlineAllowed = inlineData;
        break;
      case "directory": {
        const entries = children.get(inode)!;
        const plan = planDirBlocks(entries);
        node.dir = { entries, plan };
        node.size = plan.size;
        break;
      }
      case "symlink":
        node.target = toBytes(inode.target);
        if (node.target.length > MAX_SYMLINK)
          throw new KilnError(
            "UNSUPPORTED_ARCHIVE",
            `symlink /${pathOf(node)} has a target longer than ${MAX_SYMLINK} bytes`,
          );
        node.size = node.target.length;
        break;
      case "char":
      case "block":
        if (inode.rdevMajor > 0xfff || inode.rdevMinor > 0xfffff)
          throw new KilnError(
            "UNSUPPORTED_ARCHIVE",
            `device /${pathOf(node)} ${inode.rdevMajor}:${inode.rdevMinor} is out of range`,
          );
        node.u = encodeRdev(inode.rdevMajor, inode.rdevMinor);
        break;
      default:
        break;
    }
    checkOwner(inode, `/${pathOf(node)}`);
    node.extended = !fitsCompact(
      {
        uid: inode.uid,
        gid: inode.gid,
        nlink: node.nlink,
        size: node.size,
        mtime: inode.mtime,
        mtimeNsec: inode.mtimeNsec,
      },
      buildTime,
      buildTimeNsec,
    );
    const hasData = inode.type === "file" || inode.type === "directory" || inode.type === "symlink";
    if (inode.type === "file" && inode.data?.sparse) {
      // Holes stay holes: only chunks that hold data get blocks.
      node.chunks = planChunks(node.size, inode.data.sparse);
      node.layout = CHUNK_BASED;
      node.blocks = node.chunks.blocks;
      node.u = node.chunks.bits;
    } else if (hasData) {
      const tail = node.size % BLOCK_SIZE;
      if (inlineAllowed && tail > 0 && inodeSize(node) + node.xattrs.length + tail <= BLOCK_SIZE) {
        node.layout = FLAT_INLINE;
        node.tail = tail;
        node.blocks = Math.floor(node.size / BLOCK_SIZE);
      } else {
        node.blocks = Math.ceil(node.size / BLOCK_SIZE);
      }
    }
  }

  // Blocks: regular files in dataOrder first, then directories and symlinks.
  let next = 1;
  const place = (node: Node): void => {
    if (node.chunks) {
      node.chunks.start = next;
      next += node.blocks;
    } else if (node.blocks > 0) {
      node.u = next;
      next += node.blocks;
    } else if (node.layout === FLAT_INLINE || node.inode.type === "file" || node.inode.type === "directory") {
      node.u = NULL_ADDR;
    }
  };
  for (const inode of files) place(byInode.get(inode)!);
  const others = nodes.filter((node) => node.inode.type !== "file" || !node.inode.data);
  for (const node of others) place(node);
  const metaBlkaddr = next;

  // Slots: 32-byte aligned; a slot that fits in a block never straddles two.
  let offset = SLOT_SIZE;
  const placeSlot = (node: Node): void => {
    const size = slotSize(node);
    offset = Math.ceil(offset / SLOT_SIZE) * SLOT_SIZE;
    if (size <= BLOCK_SIZE && (offset % BLOCK_SIZE) + size > BLOCK_SIZE)
      offset = Math.ceil(offset / BLOCK_SIZE) * BLOCK_SIZE;
    node.offset = offset;
    offset += size;
  };
  for (const node of others) placeSlot(node);
  for (const inode of files) placeSlot(byInode.get(inode)!);
  const metaBytes = Math.ceil(offset / BLOCK_SIZE) * BLOCK_SIZE;
  const filesOffset = files.length > 0 ? byInode.get(files[0]!)!.offset : metaBytes;
  if (slotOf(nodes[0]!) > 0xffff)
    throw new KilnError("INTERNAL", "EROFS root inode nid does not fit 16 bits");

  // Directory entries point at nids, known now.
  for (const node of nodes) {
    for (const e of node.dir?.entries ?? []) e.nid = slotOf(byInode.get(e.ref)!);
  }

  const totalBlocks = metaBlkaddr + metaBytes / BLOCK_SIZE;
  if (totalBlocks > 0xffffffff)
    throw new KilnError(
      "TOO_LARGE",
      `EROFS image would need ${totalBlocks} blocks; 4 KiB blocks address at most 16 TiB`,
    );
  return {
    nodes,
    byInode,
    files,
    filesOffset,
    buildTime,
    buildTimeNsec,
    metaBlkaddr,
    metaBytes,
    totalBlocks,
    chunked: files.some((f) => byInode.get(f)!.chunks !== undefined),
  };
}
