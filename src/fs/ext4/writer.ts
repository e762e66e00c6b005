/**
 * ext4 writer. Everything is planned from the tree before any file byte is read: inode numbers,
 * directory blocks, extent trees, attribute blocks, then the geometry and one position for each.
 * File data is then streamed in dataOrder to its blocks (zero blocks stay holes of the output
 * file), and the metadata is encoded and written meanwhile, on the main thread while the file data
 * waits on the disk. Allocation is a prefix of the block and inode spaces.
 */

import { type FileHandle, open } from "node:fs/promises";
import { KilnError } from "../../errors.js";
import { showBytes, toBytes } from "../../io/bytestring.js";
import { DataStream, isZeroRange, openDirect } from "../datastream.js";
import { ALL_BLOCKS, type BlockRun, mappedRuns, placeRuns, runBlocks, writeRegions } from "../file-blocks.js";
import { layerRuns, writeRuns } from "../layer-runs.js";
import { regionPieces } from "../sparse.js";
import type { Staging } from "../staging.js";
import { TimeSlices } from "../time-slices.js";
import {
  type ContentSource,
  checkOwner,
  type Inode,
  MemoryContent,
  newInode,
  sortDataOrder,
  sortedNames,
  walk,
} from "../tree.js";
import {
  buildDirectory,
  type DirEntry,
  directoryShape,
  FT_BLK,
  FT_CHR,
  FT_DIR,
  FT_FIFO,
  FT_REG,
  FT_SOCK,
  FT_SYMLINK,
  namesFitOneBlock,
} from "./dir.js";
import { hashSeedWords } from "./dirhash.js";
import { buildTree, extentCount, type Run, toExtents, treeBlocks } from "./extents.js";
import { buildGroups } from "./group.js";
import {
  encodeInode,
  FL_EXTENTS,
  FL_INDEX,
  I_BLOCK,
  I_BLOCK_SIZE,
  inodeSeed,
  S_IFBLK,
  S_IFCHR,
  S_IFDIR,
  S_IFIFO,
  S_IFLNK,
  S_IFREG,
  S_IFSOCK,
  sealInode,
  writeDeviceBlock,
} from "./inode.js";
import {
  defaultJournalBlocks,
  encodeJournalSuperblock,
  JOURNAL_INO,
  journalBlocksForSize,
  journalTreeBlocks,
} from "./journal.js";
import { BLOCK_SIZE, type Geometry, INODE_SIZE, planGeometry } from "./layout.js";
import { checksumSeed, encodeSuperblock, FIRST_INODE } from "./superblock.js";
import {
  blockKey,
  buildXattrBlock,
  encodeXattrs,
  MAX_XATTR_REFCOUNT,
  placeXattrs,
  writeInlineXattrs,
  type XattrEntry,
} from "./xattr.js";

export interface Ext4Options {
  /** Filesystem UUID (16 bytes), derived from the image digest by the caller. */
  uuid: Buffer;
  /** Directory hash seed (16 bytes). */
  hashSeed: Buffer;
  /** Exact output size in bytes; too small → TOO_LARGE naming the size needed. */
  size?: number | undefined;
  /** Extra free bytes beyond the default headroom (also adds one inode per 16 KiB). */
  free?: number | undefined;
  /** Extra free inodes. */
  freeInodes?: number | undefined;
  /** Volume label, at most 16 bytes. */
  label?: string | undefined;
  /** Seconds since the epoch for the superblock times; 0 by default (no clock). */
  buildTime?: number | undefined;
  /**
   * A jbd2 journal (inode 8), for disks mounted read-write; off by default. `size` in bytes;
   * by default mke2fs's size for the filesystem size. Its blocks count in the sizing.
   */
  journal?: boolean | { size?: number | undefined } | undefined;
  /**
   * The file data staged in `out` while the layers were read (../staging.ts): `out` is that file,
   * and only the layers it did not stage are read from `content`.
   */
  staging?: Staging | undefined;
}

export interface Ext4Result {
  bytes: number;
  blocks: number;
  inodes: number;
}

const ROOT_INODE = 2;
const LOST_FOUND = "lost+found";
/** lost+found gets 16 KiB like mkfs makes it, so e2fsck can reconnect files without allocating. */
const LOST_FOUND_BLOCKS = 4;
const MAX_LINKS = 65000;
/** Extents address logical blocks below 2^32 - 1: a (sparse) file beyond that cannot be mapped. */
const MAX_FILE_SIZE = (2 ** 32 - 1) * BLOCK_SIZE;
const FAST_SYMLINK_MAX = 59;

const MODE_BITS: Record<Inode["type"], number> = {
  file: S_IFREG,
  directory: S_IFDIR,
  symlink: S_IFLNK,
  char: S_IFCHR,
  block: S_IFBLK,
  fifo: S_IFIFO,
  socket: S_IFSOCK,
};
const DIRENT_TYPES: Record<Inode["type"], number> = {
  file: FT_REG,
  directory: FT_DIR,
  symlink: FT_SYMLINK,
  char: FT_CHR,
  block: FT_BLK,
  fifo: FT_FIFO,
  socket: FT_SOCK,
};

/** One inode as planned: its number, links, attributes and where its blocks go. */
interface Node {
  ino: number;
  inode: Inode;
  parent: number;
  links: number;
  inline: readonly XattrEntry[];
  xattrKey: string | undefined;
  blockXattrs: readonly XattrEntry[];
  xattrBlock: number;
  /** Directory blocks, or the one block of a slow symlink, or file data blocks. */
  blocks: number;
  /** Logical runs that have blocks: ALL_BLOCKS (0 to `blocks`) unless a sparse file's. */
  mapped: readonly BlockRun[];
  extents: number;
  tree: number;
  indexed: boolean;
  /** Physical start of its blocks and of its extent tree blocks. */
  start: number;
  treeStart: number;
}

const NO_PLACEMENT: { readonly inline: readonly XattrEntry[]; readonly block: readonly XattrEntry[] } = {
  inline: Object.freeze([]),
  block: Object.freeze([]),
};

function fail(code: "UNSUPPORTED_ARCHIVE" | "INTERNAL", message: string): never {
  throw new KilnError(code, message);
}

/** A node's mapped runs as a list (ALL_BLOCKS spelled out). */
function logicalRuns(node: Node): readonly BlockRun[] {
  if (node.mapped !== ALL_BLOCKS) return node.mapped;
  return node.blocks > 0 ? [{ logical: 0, length: node.blocks }] : [];
}

function physicalRuns(node: Node): Run[] {
  return placeRuns(logicalRuns(node), node.start);
}

function dirEntries(dir: Inode, nodes: Map<Inode, Node>): DirEntry[] {
  return sortedNames(dir).map((name) => {
    const child = dir.entries!.get(name)!;
    return { name: toBytes(name), ino: nodes.get(child)!.ino, type: DIRENT_TYPES[child.type] };
  });
}

/** Where `inode` is in the tree, for the rare error about it (nodes keep no path: one per inode adds up). */
function pathOf(root: Inode, inode: Inode): string {
  for (const item of walk(root)) if (item.inode === inode) return `/${showBytes(item.path)}`;
  return "(not in the tree)";
}

/** The journal's contiguous run of blocks and its extent tree blocks (over 4 extents). */
interface JournalPlan {
  start: number;
  blocks: number;
  treeStart: number;
  tree: number;
}

interface Plan {
  root: Inode;
  journal: JournalPlan | undefined;
  nodes: Node[];
  byInode: Map<Inode, Node>;
  geometry: Geometry;
  usedBlocks: number;
  usedInodes: number;
  xattrBlocks: Map<string, { block: number; refcount: number; entries: readonly XattrEntry[] }>;
  files: Inode[];
  lostFound: Inode | undefined;
  hashSeed: Uint32Array;
  fsSeed: number;
}

function plan(withLostFound: Inode, opts: Ext4Options): Plan {
  const fsSeed = checksumSeed(opts.uuid);
  const hashSeed = hashSeedWords(opts.hashSeed);
  const byInode = new Map<Inode, Node>();
  const nodes: Node[] = [];
  // Inode 11 is lost+found; a tree whose lost+found is not a directory gets no such inode.
  const lostFound = withLostFound.entries!.get(LOST_FOUND);
  const lostFoundIno = lostFound?.type === "directory" ? FIRST_INODE : 0;
  let nextIno = lostFoundIno ? FIRST_INODE + 1 : FIRST_INODE;
  // Regular files with data, put in dataOrder below (dataOrder would walk the tree again).
  const files: Inode[] = [];
  // Link counts come from this same walk (linkCounts would walk the tree again): a file's from its
  // names, a directory's from "." and its name plus each subdirectory's "..".
  for (const item of walk(withLostFound)) {
    const inode = item.inode;
    if (!item.first) {
      if (inode.type !== "directory" && ++byInode.get(inode)!.links > MAX_LINKS)
        fail(
          "UNSUPPORTED_ARCHIVE",
          `/${showBytes(item.path)}: more than ${MAX_LINKS} hard links to one file`,
        );
      continue;
    }
    if (item.name.length > 255)
      fail("UNSUPPORTED_ARCHIVE", `/${showBytes(item.path)}: name longer than 255 bytes`);
    let ino: number;
    if (item.parent === undefined) ino = ROOT_INODE;
    else if (item.parent === withLostFound && item.name === LOST_FOUND && inode.type === "directory")
      ino = FIRST_INODE;
    else ino = nextIno++;
    const where = `/${showBytes(item.path)}`;
    checkOwner(inode, where);
    if (inode.type === "symlink" && inode.target.length >= BLOCK_SIZE)
      fail("UNSUPPORTED_ARCHIVE", `${where}: symlink target longer than ${BLOCK_SIZE - 1} bytes`);
    if (inode.type === "file" && inode.data) files.push(inode);
    // Most inodes have no attributes: they share one empty placement instead of three arrays each.
    const placed =
      inode.xattrs.size === 0 ? NO_PLACEMENT : placeXattrs(encodeXattrs(inode.xattrs, where), where);
    const node: Node = {
      ino,
      inode,
      parent: item.parent ? byInode.get(item.parent)!.ino : ROOT_INODE,
      links: inode.type === "directory" ? 2 : 1,
      inline: placed.inline,
      xattrKey: placed.block.length > 0 ? blockKey(placed.block) : undefined,
      blockXattrs: placed.block,
      xattrBlock: 0,
      blocks: 0,
      mapped: ALL_BLOCKS,
      extents: 0,
      tree: 0,
      indexed: false,
      start: 0,
      treeStart: 0,
    };
    if (inode.type === "directory" && item.parent) byInode.get(item.parent)!.links++;
    byInode.set(inode, node);
    nodes.push(node);
  }
  nodes.sort((a, b) => a.ino - b.ino);

  // Block counts (positions come later; directory contents do not depend on them).
  for (const node of nodes) {
    const inode = node.inode;
    if (inode.type === "directory") {
      if (node.links > MAX_LINKS) node.links = 1; // dir_nlink
      const pad = inode === lostFound ? LOST_FOUND_BLOCKS - 1 : 0;
      const d = namesFitOneBlock(inode.entries!.keys())
        ? { blocks: 1 + pad, indexed: false }
        : directoryShape(dirEntries(inode, byInode), hashSeed, pad);
      node.blocks = d.blocks;
      node.indexed = d.indexed;
    } else if (inode.type === "symlink") {
      if (inode.target.length > FAST_SYMLINK_MAX) node.blocks = 1;
    } else if (inode.type === "file") {
      if (inode.size > MAX_FILE_SIZE)
        throw new KilnError(
          "TOO_LARGE",
          `${pathOf(withLostFound, inode)} is ${inode.size} bytes; ext4 with 4 KiB blocks holds files of at most ${MAX_FILE_SIZE}`,
        );
      node.mapped = inode.data ? mappedRuns(inode.size, inode.data.sparse) : [];
      node.blocks = runBlocks(inode.size, node.mapped);
    }
    node.extents = extentCount(logicalRuns(node));
    node.tree = treeBlocks(node.extents);
  }

  // Shared attribute blocks, counted once each (a block holds at most MAX_XATTR_REFCOUNT users).
  const xattrBlocks = new Map<string, { block: number; refcount: number; entries: readonly XattrEntry[] }>();
  let xattrCount = 0;
  const users = new Map<string, number>();
  for (const node of nodes) {
    if (!node.xattrKey) continue;
    const n = users.get(node.xattrKey) ?? 0;
    if (n % MAX_XATTR_REFCOUNT === 0) xattrCount++;
    users.set(node.xattrKey, n + 1);
  }

  sortDataOrder(files);
  const contentBlocks = nodes.reduce((s, n) => s + n.blocks + n.tree, 0) + xattrCount;
  const usedInodes = nodes[nodes.length - 1]!.ino;
  const fixedJournal =
    typeof opts.journal === "object" && opts.journal.size !== undefined
      ? journalBlocksForSize(opts.journal.size)
      : undefined;
  const journalSize = (fsBlocks: number) => fixedJournal ?? defaultJournalBlocks(fsBlocks);
  const geometry = planGeometry({
    contentBlocks,
    usedInodes,
    size: opts.size,
    free: opts.free,
    freeInodes: opts.freeInodes,
    journal: opts.journal
      ? (fsBlocks) => journalSize(fsBlocks) + journalTreeBlocks(journalSize(fsBlocks))
      : undefined,
  });

  // Positions: the journal, then directory, symlink, tree and attribute blocks (inode order),
  // then file data.
  let cursor = geometry.metaEnd;
  let journal: JournalPlan | undefined;
  if (opts.journal) {
    const blocks = journalSize(geometry.blocks);
    const tree = journalTreeBlocks(blocks);
    journal = { start: cursor, blocks, treeStart: cursor + blocks, tree };
    cursor += blocks + tree;
  }
  for (const node of nodes) {
    if (node.inode.type !== "file") {
      node.start = cursor;
      cursor += node.blocks;
    }
    node.treeStart = cursor;
    cursor += node.tree;
    if (node.xattrKey) {
      // Each run of MAX_XATTR_REFCOUNT users of the same content gets its own block.
      let slot = 0;
      let entry = xattrBlocks.get(`${node.xattrKey}#${slot}`);
      while (entry && entry.refcount >= MAX_XATTR_REFCOUNT)
        entry = xattrBlocks.get(`${node.xattrKey}#${++slot}`);
      if (!entry) {
        entry = {
          block: cursor++,
          refcount: 0,
          entries: node.blockXattrs,
        };
        xattrBlocks.set(`${node.xattrKey}#${slot}`, entry);
      }
      entry.refcount++;
      node.xattrBlock = entry.block;
    }
  }
  for (const inode of files) {
    const node = byInode.get(inode)!;
    node.start = cursor;
    cursor += node.blocks;
  }
  return {
    root: withLostFound,
    journal,
    nodes,
    byInode,
    geometry,
    usedBlocks: cursor,
    usedInodes,
    xattrBlocks,
    files,
    lostFound,
    hashSeed,
    fsSeed,
  };
}

/**
 * Collects blocks (queued synchronously: per-block promises are costly) and writes runs of
 * contiguous non-zero blocks in one call each; zero blocks are left as holes.
 */
class BlockSink {
  readonly #fh: FileHandle;
  /** Runs waiting to be written: start block and the buffers, contiguous. */
  #runs: { start: number; parts: Buffer[]; bytes: number }[] = [];
  #next = -1;
  #pending = 0;

  constructor(fh: FileHandle) {
    this.#fh = fh;
  }

  /** Queues `data` (whole blocks) at block `block`. The caller keeps `data` intact until drain(). */
  put(block: number, data: Buffer): void {
    const blocks = data.length / BLOCK_SIZE;
    let run = -1;
    for (let i = 0; i <= blocks; i++) {
      if (i < blocks && !isZeroRange(data, i * BLOCK_SIZE, (i + 1) * BLOCK_SIZE)) {
        if (run < 0) run = i;
      } else if (run >= 0) {
        this.#queue(block + run, data.subarray(run * BLOCK_SIZE, i * BLOCK_SIZE));
        run = -1;
      }
    }
  }

  /** One run of non-zero blocks: appended to the last run when it follows on (up to 1 MiB). */
  #queue(start: number, buf: Buffer): void {
    const last = this.#runs[this.#runs.length - 1];
    if (last && start === this.#next && last.bytes < 1 << 20) {
      last.parts.push(buf);
      last.bytes += buf.length;
    } else {
      this.#runs.push({ start, parts: [buf], bytes: buf.length });
    }
    this.#next = start + buf.length / BLOCK_SIZE;
    this.#pending += buf.length;
  }

  /** Writes what is queued when it has grown large (metadata is queued in many small pieces). */
  async drainIfLarge(): Promise<void> {
    if (this.#pending >= 8 << 20) await this.drain();
  }

  async drain(): Promise<void> {
    const runs = this.#runs;
    this.#runs = [];
    this.#pending = 0;
    this.#next = -1;
    for (const run of runs) {
      const buf = run.parts.length === 1 ? run.parts[0]! : Buffer.concat(run.parts);
      let done = 0;
      while (done < buf.length) {
        const { bytesWritten } = await this.#fh.write(
          buf,
          done,
          buf.length - done,
          run.start * BLOCK_SIZE + done,
        );
        done += bytesWritten;
      }
    }
  }
}

/**
 * Streams each file's bytes to its blocks. Files' blocks were allocated back to back in dataOrder,
 * so each layer's files are one sequential stream (layers written at once: layer-runs.ts); a sparse
 * file arrives as its data regions only, its holes are left unmapped.
 */
async function writeData(
  p: Plan,
  toWrite: Inode[],
  content: ContentSource,
  fh: FileHandle,
  direct: FileHandle | undefined,
): Promise<void> {
  await writeRuns(layerRuns(toWrite), async (files, stopped) => {
    const stream = new DataStream(fh, p.byInode.get(files[0]!)!.start * BLOCK_SIZE, direct);
    try {
      // Transient: every chunk is copied (into the data stream or a block) before the next is asked for.
      for await (const { inode, data } of content.contents(files, { transient: true })) {
        if (stopped()) break;
        const node = p.byInode.get(inode);
        if (!node) fail("INTERNAL", "content source yielded a file that is not in the tree");
        const regions = inode.data?.sparse;
        const path = () => pathOf(p.root, inode);
        if (regions) {
          // Only the data regions arrive: each goes to the blocks that map it, holes stay unwritten.
          await writeRegions(physicalRuns(node), 0, regionPieces(regions, data, path), stream, path);
          continue;
        }
        let received = 0;
        await stream.seek(node.start * BLOCK_SIZE);
        for await (const chunk of data) {
          received += chunk.length;
          if (received > inode.size)
            fail("INTERNAL", `${path()}: content longer than its size ${inode.size}`);
          await stream.put(chunk);
        }
        if (received !== inode.size)
          fail("INTERNAL", `${path()}: content has ${received} bytes, size is ${inode.size}`);
      }
    } catch (err) {
      // No write may still be in flight when the file is closed.
      await stream.settle();
      throw err;
    }
    await stream.end();
  });
}

/** Encodes node's inode into `buf` (its INODE_SIZE bytes of the inode table, zeroed). */
function encodeNode(p: Plan, node: Node, buf: Buffer): void {
  const inode = node.inode;
  const seed = inodeSeed(p.fsSeed, node.ino);
  let flags = 0;
  let size = inode.size;
  if (inode.type === "directory" || inode.type === "file" || (inode.type === "symlink" && node.blocks > 0)) {
    buildTree(
      toExtents(physicalRuns(node)),
      node.treeStart,
      seed,
      buf.subarray(I_BLOCK, I_BLOCK + I_BLOCK_SIZE),
    );
    flags = FL_EXTENTS | (node.indexed ? FL_INDEX : 0);
    if (inode.type === "directory") size = node.blocks * BLOCK_SIZE;
  }
  if (inode.type === "symlink") {
    size = inode.target.length;
    if (node.blocks === 0) buf.write(inode.target, I_BLOCK, I_BLOCK_SIZE, "latin1");
  } else if (inode.type === "char" || inode.type === "block") {
    writeDeviceBlock(buf, I_BLOCK, inode.rdevMajor, inode.rdevMinor);
  } else if (inode.type !== "file" && inode.type !== "directory") {
    size = 0;
  }
  encodeInode(buf, {
    mode: MODE_BITS[inode.type] | (inode.mode & 0o7777),
    uid: inode.uid,
    gid: inode.gid,
    size,
    links: node.links,
    time: inode.mtime,
    timeNsec: inode.mtimeNsec,
    sectors: (node.blocks + node.tree + (node.xattrBlock ? 1 : 0)) * (BLOCK_SIZE / 512),
    flags,
    xattrBlock: node.xattrBlock,
  });
  writeInlineXattrs(buf, node.inline);
  sealInode(buf, seed);
}

function journalTree(p: Plan, j: JournalPlan): ReturnType<typeof buildTree> {
  const runs = toExtents([{ logical: 0, physical: j.start, length: j.blocks }]);
  return buildTree(runs, j.treeStart, inodeSeed(p.fsSeed, JOURNAL_INO));
}

/** Inode 8 as mke2fs makes it: a regular file, mode 0600, owned by root, extent-mapped. */
function journalInodeBytes(p: Plan, j: JournalPlan, time: number): Buffer {
  const buf = Buffer.alloc(INODE_SIZE);
  encodeInode(buf, {
    mode: S_IFREG | 0o600,
    uid: 0,
    gid: 0,
    size: j.blocks * BLOCK_SIZE,
    links: 1,
    time,
    timeNsec: 0,
    sectors: (j.blocks + j.tree) * (BLOCK_SIZE / 512),
    flags: FL_EXTENTS,
    xattrBlock: 0,
  });
  journalTree(p, j).root.copy(buf, I_BLOCK);
  sealInode(buf, inodeSeed(p.fsSeed, JOURNAL_INO));
  return buf;
}

/**
 * Encodes and writes every metadata block, in turns so the file data written beside it keeps
 * moving; stops early (without an error of its own) once `stopped()`.
 */
async function writeMetadata(
  p: Plan,
  opts: Ext4Options,
  sink: BlockSink,
  stopped: () => boolean,
): Promise<void> {
  const slices = new TimeSlices();
  /** Gives the file data its turn; true once it has failed (nothing more is worth writing). */
  const pause = async () => {
    await slices.yield();
    return stopped();
  };
  const g = p.geometry;
  const j = p.journal;
  if (j) {
    // The rest of the journal is zero: holes of the output file.
    sink.put(j.start, encodeJournalSuperblock(j.blocks, opts.uuid));
    const tree = journalTree(p, j);
    for (let i = 0; i < tree.blocks.length; i++) sink.put(j.treeStart + i, tree.blocks[i]!);
  }
  // Per-inode blocks, in the order they were placed.
  for (const node of p.nodes) {
    const inode = node.inode;
    const seed = inodeSeed(p.fsSeed, node.ino);
    if (inode.type === "directory") {
      const d = buildDirectory(
        node.ino,
        node.parent,
        dirEntries(inode, p.byInode),
        p.hashSeed,
        seed,
        inode === p.lostFound ? LOST_FOUND_BLOCKS - 1 : 0,
      );
      for (let i = 0; i < d.blocks.length; i++) sink.put(node.start + i, d.blocks[i]!);
    } else if (inode.type === "symlink" && node.blocks > 0) {
      const b = Buffer.alloc(BLOCK_SIZE);
      b.write(inode.target, "latin1");
      sink.put(node.start, b);
    }
    if (node.tree > 0) {
      const tree = buildTree(toExtents(physicalRuns(node)), node.treeStart, seed);
      for (let i = 0; i < tree.blocks.length; i++) sink.put(node.treeStart + i, tree.blocks[i]!);
    }
    await sink.drainIfLarge();
    if (slices.due() && (await pause())) return;
  }
  for (const x of [...p.xattrBlocks.values()].sort((a, b) => a.block - b.block)) {
    sink.put(x.block, buildXattrBlock(x.entries, x.refcount, x.block, p.fsSeed));
    await sink.drainIfLarge();
  }
  // Inode tables, one group at a time (only the part holding used inodes; the rest is a hole).
  const byIno = new Array<Node | undefined>(p.usedInodes + 1);
  for (const n of p.nodes) byIno[n.ino] = n;
  const dirsPerGroup = new Array<number>(g.groups).fill(0);
  for (let grp = 0; grp < g.groups; grp++) {
    const first = grp * g.inodesPerGroup + 1;
    const count = Math.max(0, Math.min(g.inodesPerGroup, p.usedInodes - first + 1));
    if (count === 0) break;
    const table = Buffer.alloc(Math.ceil(count / 16) * BLOCK_SIZE);
    for (let i = 0; i < count; i++) {
      if (j && first + i === JOURNAL_INO) {
        journalInodeBytes(p, j, opts.buildTime ?? 0).copy(table, i * INODE_SIZE);
        continue;
      }
      const node = byIno[first + i];
      if (!node) continue; // other reserved inodes stay zero
      // In place: a buffer per inode would be 100k+ small allocations for a big image.
      encodeNode(p, node, table.subarray(i * INODE_SIZE, (i + 1) * INODE_SIZE));
      if (node.inode.type === "directory") dirsPerGroup[grp]!++;
      if (slices.due() && (await pause())) return;
    }
    sink.put(g.inodeTableStart + grp * g.inodeTableBlocks, table);
    await sink.drain();
  }
  const tables = buildGroups(g, p.usedBlocks, p.usedInodes, dirsPerGroup, p.fsSeed);
  sink.put(g.blockBitmapStart, tables.blockBitmaps);
  sink.put(g.inodeBitmapStart, tables.inodeBitmaps);
  sink.put(1, tables.descriptors);
  const block0 = Buffer.alloc(BLOCK_SIZE);
  encodeSuperblock({
    geometry: g,
    freeBlocks: g.blocks - p.usedBlocks,
    freeInodes: g.inodes - p.usedInodes,
    uuid: opts.uuid,
    hashSeed: opts.hashSeed,
    label: opts.label ?? "",
    time: opts.buildTime ?? 0,
    journal: j
      ? { inum: JOURNAL_INO, iblock: journalTree(p, j).root, size: j.blocks * BLOCK_SIZE }
      : undefined,
  }).copy(block0, 1024);
  sink.put(0, block0);
  await sink.drain();
}

function checkOptions(opts: Ext4Options): void {
  if (opts.uuid.length !== 16 || opts.hashSeed.length !== 16) {
    throw new KilnError("INVALID_ARGUMENT", "ext4 uuid and hashSeed must be 16 bytes each");
  }
  if (opts.label !== undefined && Buffer.byteLength(opts.label, "utf8") > 16) {
    throw new KilnError(
      "INVALID_ARGUMENT",
      `ext4 label ${JSON.stringify(opts.label)} is longer than 16 bytes`,
    );
  }
}

/** Writes `root` as an ext4 image at `out` (created or truncated), reading file bytes from `content`. */
export async function writeExt4(
  root: Inode,
  content: ContentSource,
  out: string,
  opts: Ext4Options,
): Promise<Ext4Result> {
  checkOptions(opts);
  if (root.type !== "directory")
    throw new KilnError("INVALID_ARGUMENT", "the root of an ext4 tree must be a directory");
  // lost+found (inode 11) is made as mkfs makes it unless the tree brings one.
  const withLostFound: Inode = root.entries!.has(LOST_FOUND)
    ? root
    : {
        ...root,
        entries: new Map(root.entries).set(
          LOST_FOUND,
          newInode("directory", { mode: 0o700, mtime: opts.buildTime ?? 0 }),
        ),
      };
  const p = plan(withLostFound, opts);
  const bytes = opts.size ?? p.geometry.blocks * BLOCK_SIZE;
  let files = p.files;
  if (opts.staging) {
    if (opts.staging.path !== out)
      throw new KilnError("INTERNAL", `staged data is in ${opts.staging.path}, not ${out}`);
    // The staged data moves to where the plan put it; the layers not staged are written below.
    const unstaged = await opts.staging.place(files, (inode) => p.byInode.get(inode)!, bytes);
    files = files.filter((inode) => unstaged.has(inode.data!.layer));
  }
  const fh = await open(out, opts.staging ? "r+" : "w");
  const direct = await openDirect(out);
  try {
    await fh.truncate(bytes);
    // Both to the end before the handles close; an error of the file data comes first (it names a file).
    let dataFailed = false;
    const [data, meta] = await Promise.allSettled([
      writeData(p, files, content, fh, direct).catch((err: unknown) => {
        dataFailed = true;
        throw err;
      }),
      writeMetadata(p, opts, new BlockSink(fh), () => dataFailed),
    ]);
    if (data.status === "rejected") throw data.reason;
    if (meta.status === "rejected") throw meta.reason;
  } finally {
    await direct?.close();
    await fh.close();
  }
  return { bytes, blocks: p.geometry.blocks, inodes: p.geometry.inodes };
}

export interface EmptyExt4Options {
  uuid: Buffer;
  hashSeed: Buffer;
  label?: string | undefined;
  buildTime?: number | undefined;
}

/** An empty, sparse ext4 filesystem of exactly `size` bytes (volumes, overlay upper layers). */
export async function createEmptyExt4(
  out: string,
  size: number,
  opts: EmptyExt4Options,
): Promise<Ext4Result> {
  const root = newInode("directory", { mode: 0o755, mtime: opts.buildTime ?? 0 });
  return writeExt4(root, new MemoryContent(), out, { ...opts, size });
}
