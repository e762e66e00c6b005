/**
 * Geometry of the filesystem: how many block groups, inodes per group, and where the fixed
 * metadata sits. With flex_bg every group's bitmaps and inode table may live anywhere, so all of
 * them are packed at the front (superblock, descriptors, block bitmaps, inode bitmaps, inode
 * tables) and everything after `metaEnd` is one free run for directories and file data.
 */

import { KilnError } from "../../errors.js";
import { formatSize } from "../../sizes.js";

export const BLOCK_SIZE = 4096;
export const BLOCKS_PER_GROUP = 32768;
export const INODE_SIZE = 256;
export const DESC_SIZE = 64;
const INODES_PER_BLOCK = BLOCK_SIZE / INODE_SIZE;
/** One inode bitmap block covers at most this many inodes. */
const MAX_INODES_PER_GROUP = BLOCK_SIZE * 8;
/** A last group forced by the inode count gets at least this many blocks. */
const MIN_LAST_GROUP = 256;
/** mkfs.ext4's default bytes-per-inode, used when a size is given. */
const BYTES_PER_INODE = 16384;

export interface Geometry {
  blocks: number;
  groups: number;
  inodesPerGroup: number;
  inodes: number;
  gdtBlocks: number;
  inodeTableBlocks: number;
  blockBitmapStart: number;
  inodeBitmapStart: number;
  inodeTableStart: number;
  /** First block after the fixed metadata. */
  metaEnd: number;
}

function inodesPerGroup(inodes: number, groups: number): number {
  const per = Math.ceil(inodes / groups);
  return Math.min(MAX_INODES_PER_GROUP, Math.max(INODES_PER_BLOCK, Math.ceil(per / 16) * 16));
}

export function geometry(blocks: number, groups: number, ipg: number): Geometry {
  const gdtBlocks = Math.ceil((groups * DESC_SIZE) / BLOCK_SIZE);
  const inodeTableBlocks = (ipg * INODE_SIZE) / BLOCK_SIZE;
  const blockBitmapStart = 1 + gdtBlocks;
  const inodeBitmapStart = blockBitmapStart + groups;
  const inodeTableStart = inodeBitmapStart + groups;
  return {
    blocks,
    groups,
    inodesPerGroup: ipg,
    inodes: groups * ipg,
    gdtBlocks,
    inodeTableBlocks,
    blockBitmapStart,
    inodeBitmapStart,
    inodeTableStart,
    metaEnd: inodeTableStart + groups * inodeTableBlocks,
  };
}

/** The smallest geometry holding `contentBlocks` after the metadata, `inodes` inodes and `extra` spare blocks. */
export function fit(contentBlocks: number, inodes: number, extra: number): Geometry {
  let groups = Math.max(1, Math.ceil(inodes / MAX_INODES_PER_GROUP));
  for (;;) {
    const g = geometry(0, groups, inodesPerGroup(inodes, groups));
    const blocks = Math.max(
      g.metaEnd + contentBlocks + extra,
      (groups - 1) * BLOCKS_PER_GROUP + MIN_LAST_GROUP,
    );
    const need = Math.ceil(blocks / BLOCKS_PER_GROUP);
    if (need <= groups) return { ...g, blocks };
    groups = need;
  }
}

export interface SizeRequest {
  contentBlocks: number;
  /** Inodes in use, reserved ones included. */
  usedInodes: number;
  size?: number | undefined;
  free?: number | undefined;
  freeInodes?: number | undefined;
  /** Blocks the journal takes (with its tree) in a filesystem of the given size; none if absent. */
  journal?: ((fsBlocks: number) => number) | undefined;
}

/** The smallest geometry for `content` blocks plus a journal sized for that geometry. */
function fitWithJournal(req: SizeRequest, inodes: number, extra: number): Geometry {
  let journal = req.journal?.(0) ?? 0;
  for (;;) {
    const g = fit(req.contentBlocks + journal, inodes, extra);
    // A bigger filesystem may want a bigger journal: grow until the sizes agree (sizes only grow).
    const want = req.journal?.(g.blocks) ?? 0;
    if (want <= journal) return g;
    journal = want;
  }
}

/**
 * Default: content + metadata + headroom (10 %, at least 4 MiB, plus `free`), inodes used + 10 %
 * (plus `freeInodes` and one per 16 KiB of `free`). Exact `size`: as many inodes as mkfs would
 * give that size when they fit, else fewer; too small → TOO_LARGE with the size needed.
 * The journal, if any, counts as content, sized for the filesystem it ends up in.
 */
export function planGeometry(req: SizeRequest): Geometry {
  const free = req.free ?? 0;
  const wanted =
    req.usedInodes +
    Math.max(16, Math.ceil(req.usedInodes / 10)) +
    (req.freeInodes ?? 0) +
    Math.floor(free / BYTES_PER_INODE);
  if (req.size === undefined) {
    const headroom = Math.max(Math.ceil(req.contentBlocks / 10), (4 << 20) / BLOCK_SIZE);
    return fitWithJournal(req, wanted, headroom + Math.ceil(free / BLOCK_SIZE));
  }
  const blocks = Math.floor(req.size / BLOCK_SIZE);
  const content = req.contentBlocks + (req.journal?.(blocks) ?? 0);
  const groups = Math.ceil(blocks / BLOCKS_PER_GROUP);
  const candidates = [Math.max(wanted, Math.floor(req.size / BYTES_PER_INODE)), wanted, req.usedInodes];
  for (const inodes of candidates) {
    if (groups === 0 || Math.ceil(inodes / groups) > MAX_INODES_PER_GROUP) continue;
    const g = geometry(blocks, groups, inodesPerGroup(inodes, groups));
    // The last group must at least exist beyond the metadata packed into the first ones.
    if (g.metaEnd + content <= blocks) return g;
  }
  const needed = fitWithJournal(req, req.usedInodes, 0).blocks * BLOCK_SIZE;
  throw new KilnError(
    "TOO_LARGE",
    `--size ${formatSize(req.size)} is too small: the image needs at least ${formatSize(needed, "up")}`,
    { details: { size: req.size, needed } },
  );
}
