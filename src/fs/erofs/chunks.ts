/**
 * Sparse files as chunk-based inodes: the file is cut into chunks of one size (a power of two
 * blocks); a chunk that holds any data is stored whole, back to back with the file's other stored
 * chunks, and the block map after the inode gives each chunk's first block, or NULL_ADDR for a
 * chunk that is all hole (bytes 0xff: NULL_ADDR). Nothing of a hole is written, so the work follows the data.
 */
import type { Extent } from "../tree.js";
import { BLOCK_MAP_ENTRY } from "./inode.js";
import { BLOCK_BITS, BLOCK_SIZE } from "./superblock.js";

/** i_u's chunk format holds log2(chunk / block) in 5 bits. */
const MAX_CHUNK_BITS = 31;

export interface ChunkPlan {
  /** log2 of the chunk size in blocks: the chunk format word of i_u. */
  readonly bits: number;
  /** Chunks the file spans: entries of its block map. */
  readonly count: number;
  /** Indexes of the chunks that hold data, ascending: stored in this order. */
  readonly stored: readonly number[];
  /** Blocks the stored chunks take (the file's last chunk only up to its last block). */
  readonly blocks: number;
  /** First block of the first stored chunk (set when the layout places the data). */
  start: number;
}

/** Chunks of `size` (chunk = 2^shift bytes) holding data, ascending and once each. */
function chunksWithData(regions: readonly Extent[], shift: number): number[] {
  const out: number[] = [];
  for (const r of regions) {
    if (r.size === 0) continue;
    const last = Math.floor((r.offset + r.size - 1) / 2 ** shift);
    let first = Math.floor(r.offset / 2 ** shift);
    if (out.length > 0 && out[out.length - 1]! >= first) first = out[out.length - 1]! + 1;
    for (let c = first; c <= last; c++) out.push(c);
  }
  return out;
}

function storedBlocks(size: number, shift: number, stored: readonly number[]): number {
  const chunkBlocks = 2 ** (shift - BLOCK_BITS);
  const count = Math.ceil(size / 2 ** shift);
  let blocks = stored.length * chunkBlocks;
  // The last chunk is only as long as the file, rounded up to a block.
  if (stored.length > 0 && stored[stored.length - 1] === count - 1)
    blocks += Math.ceil((size - (count - 1) * 2 ** shift) / BLOCK_SIZE) - chunkBlocks;
  return blocks;
}

/**
 * The chunk size that makes the file smallest in the image: its block map plus its stored chunks.
 * Small chunks store little beyond the data but need a map entry per chunk of the whole apparent
 * size; large chunks keep the map small but store more zeros around the data: the sum of the two
 * is least in between (for one small region in a 1 TiB file, 2 MiB chunks and a 2 MiB map).
 */
export function planChunks(size: number, regions: readonly Extent[]): ChunkPlan {
  let best: ChunkPlan | undefined;
  let bestBytes = Number.POSITIVE_INFINITY;
  for (let bits = 0; bits <= MAX_CHUNK_BITS; bits++) {
    const shift = BLOCK_BITS + bits;
    const count = Math.ceil(size / 2 ** shift);
    const stored = chunksWithData(regions, shift);
    const blocks = storedBlocks(size, shift, stored);
    const bytes = count * BLOCK_MAP_ENTRY + blocks * BLOCK_SIZE;
    if (bytes < bestBytes) {
      best = { bits, count, stored, blocks, start: 0 };
      bestBytes = bytes;
    }
    if (count === 1) break; // larger chunks change nothing
  }
  return best!;
}

/** Byte position in the image of logical `offset`, which lies in stored chunk number `rank`. */
export function chunkPosition(plan: ChunkPlan, rank: number, offset: number): number {
  const shift = BLOCK_BITS + plan.bits;
  const chunk = Math.floor(offset / 2 ** shift);
  return (plan.start + rank * 2 ** plan.bits) * BLOCK_SIZE + (offset - chunk * 2 ** shift);
}

/** Chunk index of logical `offset`. */
export function chunkOf(plan: ChunkPlan, offset: number): number {
  return Math.floor(offset / 2 ** (BLOCK_BITS + plan.bits));
}

const NULLS = Buffer.alloc(64 * 1024, 0xff);

/** The block map, in pieces (views of shared memory: copy them before asking for the next). */
export function* blockMap(plan: ChunkPlan): Generator<Buffer> {
  const entry = Buffer.alloc(BLOCK_MAP_ENTRY);
  let next = 0;
  const holes = function* (to: number) {
    for (; next < to; next += Math.min(to - next, NULLS.length / BLOCK_MAP_ENTRY))
      yield NULLS.subarray(0, Math.min(to - next, NULLS.length / BLOCK_MAP_ENTRY) * BLOCK_MAP_ENTRY);
  };
  for (let rank = 0; rank < plan.stored.length; rank++) {
    const chunk = plan.stored[rank]!;
    yield* holes(chunk);
    entry.writeUInt32LE(plan.start + rank * 2 ** plan.bits, 0);
    yield entry;
    next = chunk + 1;
  }
  yield* holes(plan.count);
}
