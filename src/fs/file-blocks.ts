/**
 * Which 4 KiB blocks of a regular file hold data, and writing a sparse file's blocks: shared by the
 * ext4 writer and the staging of file data during pass 1 (staging.ts), which must lay out each file
 * exactly as the writer does.
 */
import { KilnError } from "../errors.js";
import { type DataStream, isZeroRange } from "./datastream.js";
import type { Extent } from "./tree.js";

export const FILE_BLOCK = 4096;

/** A run of a file's logical blocks. */
export interface BlockRun {
  logical: number;
  length: number;
}

/** The usual mapping, shared: every block from logical block 0 (marked by identity, not copied). */
export const ALL_BLOCKS: readonly BlockRun[] = Object.freeze([]);

/**
 * Logical block runs that hold data: ALL_BLOCKS, or for a sparse file (its data regions given) the
 * blocks its regions touch, merged. None for an empty file.
 */
export function mappedRuns(size: number, sparse: readonly Extent[] | undefined): readonly BlockRun[] {
  const total = Math.ceil(size / FILE_BLOCK);
  if (total === 0) return [];
  if (!sparse) return ALL_BLOCKS;
  const spans = sparse
    .filter((r) => r.size > 0)
    .map(
      (r) =>
        [
          Math.floor(r.offset / FILE_BLOCK),
          Math.min(total, Math.ceil((r.offset + r.size) / FILE_BLOCK)),
        ] as const,
    )
    .sort((a, b) => a[0] - b[0]);
  const runs: BlockRun[] = [];
  for (const [from, to] of spans) {
    const last = runs[runs.length - 1];
    if (last && from <= last.logical + last.length) last.length = Math.max(last.length, to - last.logical);
    else if (to > from) runs.push({ logical: from, length: to - from });
  }
  return runs;
}

/** `runs` (a list, not ALL_BLOCKS) laid back to back from block `start`. */
export function placeRuns(runs: readonly BlockRun[], start: number): (BlockRun & { physical: number })[] {
  let next = start;
  return runs.map((r) => {
    const placed = { logical: r.logical, physical: next, length: r.length };
    next += r.length;
    return placed;
  });
}

/** Blocks a file of `size` bytes takes with these runs. */
export function runBlocks(size: number, runs: readonly BlockRun[]): number {
  return runs === ALL_BLOCKS ? Math.ceil(size / FILE_BLOCK) : runs.reduce((s, r) => s + r.length, 0);
}

/**
 * A sparse file's logical content, block by block: blocks of mapped runs go to `physical(logical)`
 * (a byte position), blocks outside them must be zeros.
 */
export async function writeSparseBlocks<R extends BlockRun>(
  runs: readonly R[],
  physical: (run: R, logical: number) => number,
  data: AsyncIterable<Buffer>,
  stream: DataStream,
  check: (chunk: Buffer) => void,
  path: () => string,
): Promise<void> {
  const block = Buffer.alloc(FILE_BLOCK);
  let fill = 0;
  let logical = 0;
  let run = 0;
  const flush = async () => {
    block.fill(0, fill);
    while (run < runs.length && runs[run]!.logical + runs[run]!.length <= logical) run++;
    const r = runs[run];
    if (!r || r.logical > logical) {
      if (!isZeroRange(block, 0, FILE_BLOCK))
        throw new KilnError("INTERNAL", `${path()}: data inside a hole of a sparse file`);
    } else {
      await stream.seek(physical(r, logical));
      await stream.put(block);
    }
    logical++;
    fill = 0;
  };
  for await (const chunk of data) {
    check(chunk);
    let off = 0;
    while (off < chunk.length) {
      const n = chunk.copy(block, fill, off);
      off += n;
      fill += n;
      if (fill === FILE_BLOCK) await flush();
    }
  }
  if (fill > 0) await flush();
}
