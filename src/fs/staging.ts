/**
 * File data staged in the image file itself while pass 1 reads the layers, so that a cold pull
 * writes the image beside decompression instead of after it.
 *
 * Where a file's data goes in an image depends on the whole merged tree (which files later layers
 * remove, how much metadata comes before the data), known only once every layer is read. So each
 * layer's regular files are written, as they are decompressed, to a provisional region of their
 * own far into the (sparse) file: their blocks back to back in tar order, laid out as the writer
 * lays out a file (file-blocks.ts). Once the image is planned, place() removes what lies before each
 * live file (other regions' slack, files that later layers removed or replaced) with fallocate's
 * COLLAPSE_RANGE: the host filesystem moves extents and no byte is copied, so the live data ends up
 * exactly where the writer would have written it: the image is the same, byte for byte.
 *
 * Where the filesystem cannot collapse ranges (tmpfs, btrfs, an old kernel) or has no `fallocate`
 * command, create() gives nothing and pass 2 writes the data as before. A layer whose stage is
 * abandoned (a write failed, it outgrew its region) is written by pass 2 too.
 */
import { spawn } from "node:child_process";
import { type FileHandle, open, rm, truncate } from "node:fs/promises";
import { KilnError } from "../errors.js";
import type { TarEntry } from "../tar/reader.js";
import { DataStream, openDirect } from "./datastream.js";
import { FILE_BLOCK, mappedRuns, placeRuns, runBlocks, writeRegions } from "./file-blocks.js";
import { regionPieces } from "./sparse.js";
import type { Inode } from "./tree.js";

/** The provisional file spans 8 TiB: under ext4's largest file (16 TiB at 4 KiB blocks), far under XFS's. */
const SPAN = 2 ** 43;
const MIB = 2 ** 20;
/**
 * Buffers of a layer's stage: the disk keeps up with decompression, and every layer read at once
 * holds its own (against the usual four: memory is what pass 1 runs short of).
 */
const STAGE_DEPTH = 2;

/** Where the writer put a file: its first block in the image (4 KiB blocks) and how many it takes. */
export interface Placement {
  readonly start: number;
  readonly blocks: number;
}

/** Errors of the layer stream (not of the stage's writes): they fail the layer. */
class SourceError {
  constructor(readonly error: unknown) {}
}

async function* tagged(data: AsyncIterable<Buffer>): AsyncGenerator<Buffer> {
  try {
    yield* data;
  } catch (err) {
    throw new SourceError(err);
  }
}

/** One layer's region: its regular files' blocks back to back, in tar order. */
export class LayerStage {
  /** Tar data offset and first block (relative to the region) of each file staged, in tar order. */
  readonly offsets: number[] = [];
  readonly starts: number[] = [];
  /** Blocks used so far. */
  used = 0;
  complete = false;
  abandoned = false;
  readonly #stream: DataStream;
  readonly #base: number;
  readonly #limit: number;

  constructor(stream: DataStream, base: number, limitBlocks: number) {
    this.#stream = stream;
    this.#base = base;
    this.#limit = limitBlocks;
  }

  /**
   * Writes a regular file's data (read it here, before the reader moves on). A failure of the stage
   * abandons it (the layer is then written by pass 2); a failure of the layer stream is thrown.
   */
  async add(entry: TarEntry): Promise<void> {
    if (this.abandoned || entry.size === 0) return;
    const runs = mappedRuns(entry.size, entry.sparse?.map);
    const blocks = runBlocks(entry.size, runs);
    if (this.used + blocks > this.#limit) return this.abandon();
    const start = this.used;
    this.offsets.push(entry.offset);
    this.starts.push(start);
    this.used += blocks;
    const stream = this.#stream;
    try {
      if (entry.sparse) {
        const path = () => entry.header.path;
        await writeRegions(
          placeRuns(runs, start),
          this.#base,
          regionPieces(entry.sparse.map, tagged(entry.data()), path),
          stream,
          path,
        );
      } else {
        await stream.seek(this.#base + start * FILE_BLOCK);
        for await (const chunk of tagged(entry.data())) await stream.put(chunk);
      }
    } catch (err) {
      await this.abandon();
      if (err instanceof SourceError) throw err.error;
    }
  }

  /** The layer was read whole (and verified): its region is complete once its writes are. */
  async finish(): Promise<void> {
    if (this.abandoned) return;
    try {
      await this.#stream.end();
      this.complete = true;
    } catch {
      this.abandoned = true;
    }
  }

  /** Nothing more is staged for this layer; what was written is left for place() to drop. */
  async abandon(): Promise<void> {
    if (this.abandoned) return;
    this.abandoned = true;
    await this.#stream.settle();
  }
}

/** Runs `fallocate --collapse-range` for each [offset, length) in turn (bytes), in one shell. */
async function collapse(path: string, ranges: readonly (readonly [number, number])[]): Promise<void> {
  if (ranges.length === 0) return;
  // One process for all of them: a fork of this (large) process per range would cost more than the moves.
  const quoted = `'${path.replaceAll("'", `'\\''`)}'`;
  const script = ranges.map(([o, l]) => `fallocate --collapse-range --offset ${o} --length ${l} ${quoted}`);
  await new Promise<void>((resolve, reject) => {
    const child = spawn("sh", ["-e"], { stdio: ["pipe", "ignore", "pipe"] });
    let stderr = "";
    child.stderr.setEncoding("utf8").on("data", (s: string) => {
      stderr += s;
    });
    child.on("error", (err) =>
      reject(new KilnError("STORE", `cannot move staged data in ${path}: ${err.message}`)),
    );
    child.on("close", (code) => {
      if (code === 0) resolve();
      else
        reject(
          new KilnError("STORE", `cannot move staged data in ${path}: ${stderr.trim() || `exit ${code}`}`),
        );
    });
    child.stdin.on("error", () => {}); // a shell that died early is reported by its exit
    child.stdin.end(`${script.join("\n")}\n`);
  });
}

export class Staging {
  readonly path: string;
  readonly #fh: FileHandle;
  readonly #direct: FileHandle | undefined;
  /** Bytes between two regions' starts; region k starts at (k + 1) * spacing. */
  readonly #spacing: number;
  readonly #layers = new Map<number, LayerStage>();
  /** The writer took the file over (it is the image now): discard() leaves it alone. */
  #claimed = false;
  #closed: Promise<void> | undefined;

  private constructor(path: string, fh: FileHandle, direct: FileHandle | undefined, spacing: number) {
    this.path = path;
    this.#fh = fh;
    this.#direct = direct;
    this.#spacing = spacing;
  }

  /**
   * A staging file at `path` (created; it must not exist) for an image of `layers` layers, or
   * undefined where it cannot work (nothing is left behind then).
   */
  static async create(path: string, layers: number): Promise<Staging | undefined> {
    const fh = await open(path, "wx+").catch(() => undefined);
    if (!fh) return undefined;
    try {
      const spacing = Math.floor(SPAN / (layers + 1) / MIB) * MIB;
      // A collapse near the end tells whether the filesystem takes them, at the cost of one process.
      await fh.truncate(SPAN);
      await collapse(path, [[SPAN - 2 * FILE_BLOCK, FILE_BLOCK]]);
      await fh.truncate(SPAN);
      return new Staging(path, fh, await openDirect(path), spacing);
    } catch {
      await fh.close().catch(() => {});
      await rm(path, { force: true });
      return undefined;
    }
  }

  /** The stage of layer `index` (once per layer). */
  stageLayer(index: number): LayerStage {
    if (this.#layers.has(index)) throw new KilnError("INTERNAL", `layer ${index} staged twice`);
    const base = (index + 1) * this.#spacing;
    // Half the spacing at most: the image and every region's slack stay below the next region.
    const stage = new LayerStage(
      new DataStream(this.#fh, base, this.#direct, STAGE_DEPTH),
      base,
      this.#spacing / 2 / FILE_BLOCK,
    );
    this.#layers.set(index, stage);
    return stage;
  }

  /**
   * Makes the file the image's data: `files` (with data) in dataOrder, each where `where` says.
   * Returns the layers whose files the writer must still write (not staged, or not usable); the
   * file is then `bytes` long, staged data in place and everything else a hole. Call once every
   * layer stage has finished.
   */
  async place(
    files: readonly Inode[],
    where: (file: Inode) => Placement,
    bytes: number,
  ): Promise<Set<number>> {
    this.#claimed = true;
    await this.#close();
    const unstaged = new Set<number>();
    const ranges: [number, number][] = [];
    let shift = 0;
    const cut = (want: number, at: number) => {
      if (at < want) throw new KilnError("INTERNAL", `staged data of ${this.path} is below its place`);
      if (at > want) ranges.push([want, at - want]);
      shift += at - want;
    };
    const layerOf = (k: number) => files[k]!.data!.layer;
    for (let i = 0; i < files.length; ) {
      const layer = layerOf(i);
      let j = i;
      while (j < files.length && layerOf(j) === layer) j++;
      // Placed only when complete and every live file is staged with the writer's block count.
      const stage = this.#layers.get(layer);
      const rel =
        stage?.complete && bytes <= this.#spacing / 2 ? relStarts(stage, files, where, i, j) : undefined;
      if (!stage || !rel) {
        unstaged.add(layer);
        i = j;
        continue;
      }
      const base = (layer + 1) * this.#spacing;
      for (let k = i; k < j; k++)
        cut(where(files[k]!).start * FILE_BLOCK, base + rel[k - i]! * FILE_BLOCK - shift);
      // Files after the last live one (later layers removed them): gone too.
      const last = where(files[j - 1]!);
      const end = (last.start + last.blocks) * FILE_BLOCK;
      cut(end, end + (stage.used - rel[j - 1 - i]! - last.blocks) * FILE_BLOCK);
      i = j;
    }
    await collapse(this.path, ranges);
    await truncate(this.path, bytes);
    return unstaged;
  }

  /** Removes the file unless the writer took it; waits for the stages' writes first. */
  async discard(): Promise<void> {
    await this.#close();
    if (!this.#claimed) await rm(this.path, { force: true });
  }

  #close(): Promise<void> {
    this.#closed ??= this.#closeOnce();
    return this.#closed;
  }

  async #closeOnce(): Promise<void> {
    for (const stage of this.#layers.values()) if (!stage.complete) await stage.abandon();
    await this.#direct?.close().catch(() => {});
    await this.#fh.close().catch(() => {});
  }
}

/**
 * The staged first block of files[from, to) (one layer's, in dataOrder), or undefined when one is
 * missing or laid out otherwise than the writer lays it out.
 */
function relStarts(
  stage: LayerStage,
  files: readonly Inode[],
  where: (file: Inode) => Placement,
  from: number,
  to: number,
): number[] | undefined {
  const rel: number[] = [];
  let s = 0;
  for (let k = from; k < to; k++) {
    const offset = files[k]!.data!.offset;
    while (s < stage.offsets.length && stage.offsets[s]! < offset) s++;
    if (stage.offsets[s] !== offset) return undefined;
    const blocks = (stage.starts[s + 1] ?? stage.used) - stage.starts[s]!;
    if (blocks !== where(files[k]!).blocks) return undefined;
    rel.push(stage.starts[s]!);
    s++; // two files on one data ref are placed twice: the second is not staged
  }
  return rel;
}
