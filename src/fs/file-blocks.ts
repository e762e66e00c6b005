/**
 * Which 4 KiB blocks of a regular file hold data, and writing a sparse file's data to them: shared by the
 * ext4 writer and the staging of file data during pass 1 (staging.ts), which must lay out each file
 * exactly as the writer does.
 */
import { KilnError } from "../errors.js";
import type { DataStream } from "./datastream.js";
import type { Piece } from "./sparse.js";
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
 * A sparse file's data pieces (sparse.ts) to the blocks of its placed runs: each piece at its
 * logical offset within the run that maps it, starting at byte `base`. Holes are never touched.
 */
export async function writeRegions(
  runs: readonly (BlockRun & { physical: number })[],
  base: number,
  pieces: AsyncIterable<Piece>,
  stream: DataStream,
  path: () => string,
): Promise<void> {
  let run = 0;
  for await (const { offset, bytes } of pieces) {
    const block = Math.floor(offset / FILE_BLOCK);
    while (run < runs.length && runs[run]!.logical + runs[run]!.length <= block) run++;
    const r = runs[run];
    if (!r || r.logical > block || offset + bytes.length > (r.logical + r.length) * FILE_BLOCK)
      throw new KilnError("INTERNAL", `${path()}: data at offset ${offset} outside its mapped blocks`);
    await stream.seek(base + (r.physical - r.logical) * FILE_BLOCK + offset);
    await stream.put(bytes);
  }
}
