/**
 * Sparse files as data regions. A ContentSource delivers a sparse file's stored bytes only (its
 * regions back to back, in map order), never its holes: writers place each piece at its logical
 * offset, so the work follows the data, not the apparent size (a 1 TiB file of 4 KiB of data is
 * 4 KiB of work).
 */
import { KilnError } from "../errors.js";
import type { Extent, Inode } from "./tree.js";

/** A piece of a sparse file's data: `bytes` at logical `offset`, never across a region's end. */
export interface Piece {
  readonly offset: number;
  readonly bytes: Buffer;
}

/** The data regions of a file delivered as regions (DataRef.sparse), or undefined for a plain file. */
export function regionsOf(inode: Inode): readonly Extent[] | undefined {
  return inode.data?.sparse;
}

/**
 * Cuts a sparse file's stored bytes at its regions' ends. The pieces are views of the chunks
 * given: a consumer of a transient source copies them before asking for the next.
 */
export async function* regionPieces(
  regions: readonly Extent[],
  stored: AsyncIterable<Buffer>,
  path: () => string,
): AsyncGenerator<Piece> {
  let i = 0;
  let into = 0;
  const nextRegion = () => {
    while (i < regions.length && into === regions[i]!.size) {
      i++;
      into = 0;
    }
  };
  for await (const chunk of stored) {
    let from = 0;
    while (from < chunk.length) {
      nextRegion();
      const r = regions[i];
      if (!r) throw new KilnError("INTERNAL", `${path()}: more stored bytes than its sparse map holds`);
      const n = Math.min(chunk.length - from, r.size - into);
      yield { offset: r.offset + into, bytes: chunk.subarray(from, from + n) };
      into += n;
      from += n;
    }
  }
  nextRegion();
  if (i < regions.length)
    throw new KilnError("INTERNAL", `${path()}: fewer stored bytes than its sparse map holds`);
}

const ZEROS = Buffer.alloc(64 * 1024);

/**
 * A sparse file's logical bytes (exactly `size`) from its pieces, holes as views of one shared
 * zero buffer (read them, never write into them): for outputs that cannot hold holes.
 */
export async function* withHoles(pieces: AsyncIterable<Piece>, size: number): AsyncGenerator<Buffer> {
  let pos = 0;
  const zeros = function* (to: number) {
    for (; pos < to; pos += Math.min(to - pos, ZEROS.length))
      yield ZEROS.subarray(0, Math.min(to - pos, ZEROS.length));
  };
  for await (const p of pieces) {
    yield* zeros(p.offset);
    yield p.bytes;
    pos += p.bytes.length;
  }
  yield* zeros(size);
}

/** The logical bytes of a file as a ContentSource delivers it (a sparse file's holes as zeros). */
export function logicalContent(
  inode: Inode,
  data: AsyncIterable<Buffer>,
  path: () => string,
): AsyncIterable<Buffer> {
  const regions = regionsOf(inode);
  return regions ? withHoles(regionPieces(regions, data, path), inode.size) : data;
}
