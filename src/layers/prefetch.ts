/**
 * Pass 1 of an export run during the pull: as each layer's compressed bytes arrive, they are also
 * decompressed, checked against the diff ID, and their tar headers read (the decompressed tar
 * spooled for pass 2, within a budget). So when the last layer is in, only pass 2 remains:
 * download, decompression, hashing and header parsing overlap instead of following each other.
 * A tap never fails the pull: a layer that does not read (a corrupt tar, a wrong diff ID) keeps its
 * error for the export, which reports it exactly as its own pass 1 would have.
 *
 * Given a TreeBuilder, the layers are also merged as they are read, bottom first: layer N's entries
 * go into the tree as they are parsed once layers 0..N-1 are merged, and are kept until then. So
 * headers die young instead of piling up for the export (about 320 bytes each, tens of thousands
 * per image), and the merge is done when the download is. The prefetch merges a run of layers from
 * the bottom; the export merges the rest (a layer that was already in the store, or one that ended
 * before its turn) into the same builder.
 */
import { open } from "node:fs/promises";
import type { BlobTap, TappedLayer } from "../source/ingest.js";
import { readTar, type TarEntry } from "../tar/reader.js";
import { openLayerStream } from "./decompress.js";
import { Spool, SpoolBudget, spoolThrough } from "./files.js";
import type { LayerEntry, LayerSink, TreeBuilder } from "./merge.js";

/** What pass 1 made of one layer: its entries, and its decompressed tar when spooled whole. */
export interface PrefetchedLayer {
  /** Empty once merged. */
  entries: LayerEntry[];
  spool: Spool | undefined;
  /** The layer index it was merged into the builder as; undefined: the export merges `entries`. */
  merged: number | undefined;
}

/**
 * Where pass 1 may write each layer's regular files as it reads them (src/fs/staging.ts), so the
 * image is written beside decompression; a staged layer needs no spool and no pass 2 read.
 */
export interface Stager {
  stageLayer(index: number): LayerStageSink;
  /** Removes what was staged, unless the image took it over. */
  discard(): Promise<void>;
}

export interface LayerStageSink {
  /** Reads and writes a regular file's data; throws only what reading the layer throws. */
  add(entry: TarEntry): Promise<void>;
  /** The layer was read whole and verified. */
  finish(): Promise<void>;
  abandon(): Promise<void>;
}

/** Compressed bytes queued for a tap's reader before the download waits: two of ingest's pieces. */
const QUEUE_BYTES = 1 << 20;

export class HeaderPrefetch<S extends Stager = Stager> {
  readonly #spoolPrefix: string;
  /** Makes the stager once the layer count is known (at the first tap); none: nothing is staged. */
  readonly #makeStager: ((layers: number) => Promise<S | undefined>) | undefined;
  #stager: Promise<S | undefined> | undefined;
  /** Shared with the export's own pass (LayerFiles), for the layers not tapped. */
  readonly budget: SpoolBudget;
  readonly #layers = new Map<string, Promise<PrefetchedLayer>>();
  /** The tree layers are merged into as they are read (see above); the export finishes it. */
  readonly builder: TreeBuilder | undefined;
  /** The layer whose turn it is to merge: 0..#turn-1 are merged. */
  #turn = 0;
  /** Readers waiting for their turn, by layer index: called when it comes. */
  readonly #waiting = new Map<number, () => void>();

  /**
   * Spools go to files named PREFIX-N, at most `spoolBudget` decompressed bytes over all layers;
   * layers are merged into `builder` as they are read, when given.
   */
  constructor(opts: {
    spoolPrefix: string;
    spoolBudget: number;
    builder?: TreeBuilder | undefined;
    stager?: ((layers: number) => Promise<S | undefined>) | undefined;
  }) {
    this.#spoolPrefix = opts.spoolPrefix;
    this.#makeStager = opts.stager;
    this.budget = new SpoolBudget(opts.spoolBudget);
    this.builder = opts.builder;
  }

  /** A tap for one layer (once per digest: a layer listed twice is read once). */
  tap = (layer: TappedLayer): BlobTap | undefined => {
    if (this.#layers.has(layer.digest)) return undefined;
    const queue = new ChunkQueue();
    const done = this.#read(layer, queue);
    // Kept for take(); its reader closes the queue however it ends, so a failure never holds the download.
    done.catch(() => {});
    this.#layers.set(layer.digest, done);
    return queue;
  };

  /**
   * The layer's pass-1 result, taken over by the caller (who then owns its spool); undefined when
   * it was not tapped (already in the store). Rejects with the layer's read error.
   */
  take(digest: string): Promise<PrefetchedLayer> | undefined {
    const p = this.#layers.get(digest);
    this.#layers.delete(digest);
    return p;
  }

  /** Where the layers' file data was staged, if anywhere (once every layer read has ended). */
  get stager(): Promise<S | undefined> | undefined {
    return this.#stager;
  }

  /** Removes the spools nobody took, and the staged data unless an image took it over. */
  async close(): Promise<void> {
    const left = [...this.#layers.values()];
    this.#layers.clear();
    for (const p of left) await (await p.catch(() => undefined))?.spool?.discard();
    await (await this.#stager)?.discard();
  }

  async #read(layer: TappedLayer, queue: ChunkQueue): Promise<PrefetchedLayer> {
    const label = `layer ${layer.index + 1}/${layer.count} (${layer.digest})`;
    const file = `${this.#spoolPrefix}-${layer.index}`;
    // An uncompressed layer is read from its blob by position (see files.ts): nothing to spool.
    // Without a spool file (no budget left, or it cannot be created), pass 2 decompresses again.
    const plain = layer.diffId === null || layer.diffId.toLowerCase() === layer.digest.toLowerCase();
    if (this.#makeStager) this.#stager ??= this.#makeStager(layer.count).catch(() => undefined);
    const stage = plain ? undefined : (await this.#stager)?.stageLayer(layer.index);
    const spool =
      plain || stage || this.budget.left <= 0
        ? undefined
        : await open(file, "wx+").then(
            (fh) => new Spool(fh, file),
            () => undefined,
          );
    const merge = new TurnMerge(this.builder, layer.index);
    if (this.builder) {
      if (this.#turn === layer.index) merge.start();
      else this.#waiting.set(layer.index, () => merge.start());
    }
    try {
      const tar = openLayerStream(queue, { diffId: layer.diffId ?? undefined, label });
      for await (const e of readTar(spool ? spoolThrough(tar, spool, this.budget) : tar, { label })) {
        merge.add({ header: e.header, offset: e.offset, stored: e.stored, sparse: e.sparse });
        if (stage && e.header.type === "file") await stage.add(e);
      }
      await stage?.finish();
      // Not its turn yet: the export merges it (and everything above), so the turn stops here.
      this.#waiting.delete(layer.index);
      const merged = merge.close();
      if (merged !== undefined) this.#pass(layer.index + 1);
      return { entries: merge.entries, spool: spool?.complete ? spool : undefined, merged };
    } catch (err) {
      // A layer that fails ends the turns: nothing above it is merged here.
      this.#waiting.delete(layer.index);
      await spool?.discard();
      await stage?.abandon();
      throw err;
    } finally {
      queue.close();
    }
  }

  /** Layer `index` may merge now (it waits for its reader if that has not begun). */
  #pass(index: number): void {
    this.#turn = index;
    const start = this.#waiting.get(index);
    this.#waiting.delete(index);
    start?.();
  }
}

/**
 * One layer's entries on their way to the builder: kept until the layer's turn, then merged as they
 * come. A merge error (an invalid entry) belongs to this layer: it is kept and thrown by its reader.
 */
class TurnMerge {
  entries: LayerEntry[] = [];
  #sink: LayerSink | undefined;
  #error: unknown;

  constructor(
    readonly builder: TreeBuilder | undefined,
    readonly index: number,
  ) {}

  /** The layer's turn: what was kept goes in, and what comes next goes straight in. */
  start(): void {
    try {
      this.#sink = this.builder!.openLayer(this.index);
      for (const e of this.entries) this.#sink.add(e);
    } catch (err) {
      this.#error = err;
    }
    this.entries = [];
  }

  add(entry: LayerEntry): void {
    if (this.#error !== undefined) throw this.#error;
    if (this.#sink) this.#sink.add(entry);
    else this.entries.push(entry);
  }

  /** The index it was merged as, or undefined when its turn has not come. */
  close(): number | undefined {
    if (this.#error !== undefined) throw this.#error;
    if (!this.#sink) return undefined;
    this.#sink.close();
    return this.index;
  }
}

/**
 * A bounded queue of chunks between a download (the writer) and a reader: the writer waits while
 * QUEUE_BYTES are queued; once the reader closes it, writes are dropped.
 */
class ChunkQueue implements BlobTap, AsyncIterable<Buffer> {
  #chunks: Buffer[] = [];
  #bytes = 0;
  #ended = false;
  #closed = false;
  #error: unknown;
  #wakeReader: (() => void) | undefined;
  #wakeWriter: (() => void) | undefined;

  async write(chunk: Buffer): Promise<void> {
    if (this.#closed || this.#ended) return;
    this.#chunks.push(chunk);
    this.#bytes += chunk.length;
    this.#wake("reader");
    while (this.#bytes > QUEUE_BYTES && !this.#closed) {
      await new Promise<void>((resolve) => {
        this.#wakeWriter = resolve;
      });
    }
  }

  end(): void {
    this.#ended = true;
    this.#wake("reader");
  }

  abort(err: unknown): void {
    this.#error ??= err;
    this.#ended = true;
    this.#wake("reader");
  }

  /** The reader is done (or failed): nothing more is queued, the writer never waits again. */
  close(): void {
    this.#closed = true;
    this.#chunks = [];
    this.#bytes = 0;
    this.#wake("writer");
  }

  #wake(who: "reader" | "writer"): void {
    const wake = who === "reader" ? this.#wakeReader : this.#wakeWriter;
    if (who === "reader") this.#wakeReader = undefined;
    else this.#wakeWriter = undefined;
    wake?.();
  }

  async *[Symbol.asyncIterator](): AsyncGenerator<Buffer> {
    for (;;) {
      const chunk = this.#chunks.shift();
      if (chunk !== undefined) {
        this.#bytes -= chunk.length;
        if (this.#bytes <= QUEUE_BYTES) this.#wake("writer");
        yield chunk;
        continue;
      }
      if (this.#error !== undefined) throw this.#error;
      if (this.#ended || this.#closed) return;
      await new Promise<void>((resolve) => {
        this.#wakeReader = resolve;
      });
    }
  }
}
