/**
 * File data written one layer per stream, several layers at once. Writers place every file before
 * reading a byte, and files of one layer sit back to back in dataOrder, so each layer's run of files
 * fills a region of the image of its own: one layer can be decompressed on one core while another
 * is read and written on the other, where a single stream would take them one after the other. The
 * image does not depend on the order: every byte goes where the plan put it.
 */
import { availableParallelism } from "node:os";
import type { Inode } from "./tree.js";

/** files (in dataOrder) cut where the layer changes. */
export function layerRuns(files: readonly Inode[]): Inode[][] {
  const runs: Inode[][] = [];
  let layer: number | undefined;
  for (const inode of files) {
    const l = inode.data?.layer ?? -1;
    if (runs.length === 0 || l !== layer) runs.push([]);
    runs[runs.length - 1]!.push(inode);
    layer = l;
  }
  return runs;
}

/**
 * Runs at once: one per core (at least two, so reading one layer's file overlaps another's
 * decompression even on one core), at most four (each holds a few MiB of buffers).
 */
function runsAtOnce(): number {
  return Math.min(4, Math.max(2, availableParallelism()));
}

/**
 * Calls `write` on each run, `limit` at a time, in order. Once one fails, the others are told to
 * stop (`stopped()`, checked between files) and nothing new starts; when all have returned, the
 * failure of the lowest run is thrown, so the error does not depend on which finished first.
 */
export async function writeRuns(
  runs: readonly Inode[][],
  write: (files: Inode[], stopped: () => boolean) => Promise<void>,
  limit = runsAtOnce(),
): Promise<void> {
  const failures: { index: number; error: unknown }[] = [];
  const stopped = () => failures.length > 0;
  let next = 0;
  const worker = async () => {
    while (!stopped() && next < runs.length) {
      const index = next++;
      try {
        await write(runs[index]!, stopped);
      } catch (error) {
        failures.push({ index, error });
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, runs.length) }, worker));
  if (failures.length > 0) throw failures.sort((a, b) => a.index - b.index)[0]!.error;
}
