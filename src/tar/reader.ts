/**
 * Streaming tar reader: entries come out one at a time from an async byte stream (a decompressed
 * layer), each with the offset of its data in that stream, so a later pass can find the bytes
 * again. Only one entry's meta data (≤ MAX_META_SIZE) and one input chunk are ever held.
 *
 * Sparse files (old GNU `S` and GNU tar's PAX 0.0/0.1/1.0) carry a validated map; sparseContent
 * turns the stored regions back into the file's logical bytes.
 */
import { isKilnError, KilnError } from "../errors.js";
import { quoteBytes } from "../io/bytestring.js";
import {
  BLOCK_SIZE,
  entryDataSize,
  HeaderAssembler,
  isMetaEntry,
  MAX_META_SIZE,
  paddedSize,
  parseHeaderBlock,
  parseSparseExtension,
  type SparseRegion,
  type TarHeader,
} from "./header.js";

/** A sparse entry's layout: `map` regions (ascending, disjoint) hold data; the rest reads as zeros. */
export interface SparseMap {
  readonly realSize: number;
  readonly map: readonly SparseRegion[];
}

export interface TarEntry {
  readonly header: TarHeader;
  /** Byte offset of the entry's stored data in the input stream (after a pax-1.0 map). */
  readonly offset: number;
  /** Bytes of data stored in the archive (0 for links, directories, devices). */
  readonly stored: number;
  /** Logical size: `sparse.realSize` for sparse files, else `stored`. */
  readonly size: number;
  /** Set for sparse files; `stored` is then the sum of the region sizes. */
  readonly sparse: SparseMap | undefined;
  /**
   * The stored bytes (`stored` of them). Read it before asking for the next entry, or not at all:
   * the reader skips what is left. Use `materialize(entry)` for a sparse file's logical bytes.
   */
  data(): AsyncIterable<Buffer>;
}

export interface ReadTarOptions {
  /** Prefixes error messages (e.g. "layer 2"). */
  readonly label?: string | undefined;
}

const EMPTY = Buffer.alloc(0);

function invalid(message: string): KilnError {
  return new KilnError("INVALID_ARCHIVE", message);
}

/**
 * What the tar reader needs of its input: exact reads and skips, counting the bytes consumed. A
 * ByteReader over a stream, or a FileByteSource (src/tar/file-source.ts) over a file read by position.
 */
export interface ByteSource {
  /** Bytes consumed so far: the offset of the next byte. */
  readonly position: number;
  /** Exactly `n` contiguous bytes; null at a clean end before them, `truncated(what)` inside them. */
  read(n: number, what: string): Promise<Buffer | null>;
  /** Exactly `n` bytes or `truncated(what)`. */
  readExact(n: number, what: string): Promise<Buffer>;
  /** Yields exactly `n` bytes (chunks the consumer may keep). */
  take(n: number, what: string): AsyncGenerator<Buffer>;
  /** Discards exactly `n` bytes. */
  skip(n: number, what: string): Promise<void>;
  /** Skips up to `n` bytes; false when the input ended first (not an error). */
  skipToEnd(n: number): Promise<boolean>;
  /** Consumes the input to its end (a digest-checking stream checks there). */
  drain(): Promise<void>;
  /** Stops reading: releases the input. */
  close(): Promise<void>;
}

/**
 * Exact reads over an async stream of chunks, counting the bytes consumed. Chunks are handed on as
 * slices, not copied, except where a whole block must be contiguous.
 */
export class ByteReader implements ByteSource {
  private readonly it: AsyncIterator<Buffer>;
  private chunk: Buffer = EMPTY;
  private ended = false;
  /** Bytes consumed so far: the stream offset of the next byte. */
  position = 0;
  /** Bumped by every read, so a `take` that was overtaken cannot deliver stale bytes. */
  private generation = 0;

  constructor(
    input: AsyncIterable<Buffer>,
    private readonly truncated: (what: string) => KilnError = (what) => invalid(`truncated archive: ${what}`),
  ) {
    this.it = input[Symbol.asyncIterator]();
  }

  /** Makes `chunk` non-empty; false at the end of the input. */
  private async fill(): Promise<boolean> {
    while (this.chunk.length === 0) {
      if (this.ended) return false;
      const r = await this.it.next();
      if (r.done) {
        this.ended = true;
        return false;
      }
      this.chunk = Buffer.isBuffer(r.value) ? r.value : Buffer.from(r.value);
    }
    return true;
  }

  private consume(n: number): Buffer {
    const out = this.chunk.subarray(0, n);
    this.chunk = this.chunk.subarray(n);
    this.position += n;
    return out;
  }

  /**
   * Exactly `n` contiguous bytes; null if the input ends before the first of them (a clean end when
   * the caller allows one), `truncated(what)` if it ends inside them.
   */
  async read(n: number, what: string): Promise<Buffer | null> {
    this.generation++;
    if (!(await this.fill())) return null;
    if (this.chunk.length >= n) return this.consume(n);
    const parts: Buffer[] = [];
    let got = 0;
    while (got < n) {
      if (!(await this.fill())) throw this.truncated(what);
      const part = this.consume(Math.min(n - got, this.chunk.length));
      parts.push(part);
      got += part.length;
    }
    return Buffer.concat(parts, n);
  }

  /** Exactly `n` bytes or `truncated(what)`. */
  async readExact(n: number, what: string): Promise<Buffer> {
    if (n === 0) return EMPTY;
    const b = await this.read(n, what);
    if (b === null) throw this.truncated(what);
    return b;
  }

  /** Yields exactly `n` bytes as slices of the input chunks. */
  async *take(n: number, what: string): AsyncGenerator<Buffer> {
    const generation = ++this.generation;
    let left = n;
    while (left > 0) {
      if (generation !== this.generation) {
        throw new KilnError("INTERNAL", `${what}: read after the reader moved on`);
      }
      if (!(await this.fill())) throw this.truncated(what);
      const part = this.consume(Math.min(left, this.chunk.length));
      left -= part.length;
      yield part;
    }
  }

  /** Discards exactly `n` bytes. */
  async skip(n: number, what: string): Promise<void> {
    this.generation++;
    let left = n;
    while (left > 0) {
      if (!(await this.fill())) throw this.truncated(what);
      left -= this.consume(Math.min(left, this.chunk.length)).length;
    }
  }

  /** Skips up to `n` bytes; false when the input ended first (not an error). */
  async skipToEnd(n: number): Promise<boolean> {
    this.generation++;
    let left = n;
    while (left > 0) {
      if (!(await this.fill())) return false;
      left -= this.consume(Math.min(left, this.chunk.length)).length;
    }
    return true;
  }

  /** Reads the input to its end (a digest-checking source reports a mismatch only there). */
  async drain(): Promise<void> {
    this.generation++;
    while (await this.fill()) this.consume(this.chunk.length);
  }

  /** Stops the input early (its `return`), e.g. when the consumer gave up. */
  async close(): Promise<void> {
    if (this.ended) return;
    this.ended = true;
    this.chunk = EMPTY;
    await this.it.return?.();
  }
}

/**
 * Checks that a sparse map can be materialized: regions ascending and disjoint, inside realSize,
 * their sizes summing to the stored bytes. Anything else would silently corrupt the file.
 */
export function checkSparseMap(map: readonly SparseRegion[], realSize: number, stored: number): void {
  let end = 0;
  let sum = 0;
  for (const r of map) {
    if (r.offset < end) {
      throw invalid(`sparse map: region at ${r.offset} overlaps or precedes the one ending at ${end}`);
    }
    end = r.offset + r.size;
    if (end > realSize) throw invalid(`sparse map: region ${r.offset}+${r.size} beyond the size ${realSize}`);
    sum += r.size;
  }
  if (sum !== stored) throw invalid(`sparse map: regions hold ${sum} bytes but ${stored} are stored`);
}

const ZEROS = Buffer.alloc(64 * 1024);

function* zeros(n: number): Generator<Buffer> {
  for (let left = n; left > 0; left -= ZEROS.length) yield ZEROS.subarray(0, Math.min(left, ZEROS.length));
}

/**
 * A sparse file's logical bytes (exactly `realSize`) from its stored regions (`stored`, in map
 * order): zeros in the holes. Stored bytes that do not match the map → INVALID_ARCHIVE. The zero
 * chunks are shared: read them, do not write into them.
 */
export async function* sparseContent(
  map: readonly SparseRegion[],
  realSize: number,
  stored: AsyncIterable<Buffer>,
): AsyncGenerator<Buffer> {
  const total = map.reduce((n, r) => n + r.size, 0);
  checkSparseMap(map, realSize, total);
  const reader = new ByteReader(stored, () =>
    invalid(`sparse file: stored data is shorter than its map's ${total} bytes`),
  );
  let pos = 0;
  for (const r of map) {
    yield* zeros(r.offset - pos);
    yield* reader.take(r.size, "sparse region");
    pos = r.offset + r.size;
  }
  yield* zeros(realSize - pos);
  if (await reader.read(1, "")) {
    throw invalid(`sparse file: stored data is longer than its map's ${total} bytes`);
  }
}

/** The logical bytes of an entry: its data, with a sparse file's holes filled with zeros. */
export function materialize(entry: TarEntry): AsyncIterable<Buffer> {
  return entry.sparse ? sparseContent(entry.sparse.map, entry.sparse.realSize, entry.data()) : entry.data();
}

/** Upper bound of regions in a pax-1.0 map, so a hostile count cannot make the reader loop long. */
const MAX_SPARSE_REGIONS = MAX_META_SIZE / 4;

/**
 * GNU sparse 1.0 keeps the map at the start of the data, as decimal lines (count, then offset and
 * size per region), padded to a block. Returns the map and the bytes it occupied.
 */
async function readPax1Map(
  src: ByteSource,
  available: number,
  what: string,
): Promise<{ map: SparseRegion[]; bytes: number }> {
  const numbers: number[] = [];
  let want = 1; // the count; becomes 1 + 2 * count once known
  let digits = "";
  let bytes = 0;
  while (numbers.length < want) {
    if (bytes + BLOCK_SIZE > Math.min(available, MAX_META_SIZE)) {
      throw invalid(`${what}: sparse 1.0 map runs past the entry's data`);
    }
    const block = await src.readExact(BLOCK_SIZE, `${what}: the sparse map`);
    bytes += BLOCK_SIZE;
    for (let i = 0; i < BLOCK_SIZE && numbers.length < want; i++) {
      const c = block[i]!;
      if (c === 0x0a) {
        if (digits === "" || digits.length > 16 || !Number.isSafeInteger(Number(digits))) {
          throw invalid(`${what}: bad number "${digits.slice(0, 20)}" in the sparse 1.0 map`);
        }
        numbers.push(Number(digits));
        digits = "";
        if (numbers.length === 1) {
          if (numbers[0]! > MAX_SPARSE_REGIONS)
            throw invalid(`${what}: sparse 1.0 map of ${numbers[0]} regions`);
          want = 1 + 2 * numbers[0]!;
        }
      } else if (c >= 0x30 && c <= 0x39) {
        digits += String.fromCharCode(c);
      } else {
        throw invalid(`${what}: bad byte 0x${c.toString(16)} in the sparse 1.0 map`);
      }
    }
  }
  const map: SparseRegion[] = [];
  for (let i = 1; i < numbers.length; i += 2) map.push({ offset: numbers[i]!, size: numbers[i + 1]! });
  return { map, bytes };
}

/**
 * Reads a tar stream entry by entry. The archive may end with the two zero blocks (what follows is
 * read and ignored, so a digest-checking input sees its end) or simply at a header boundary. A cut
 * inside a header or data, a bad checksum, a bad number, a NUL in a name, an inconsistent sparse
 * map → INVALID_ARCHIVE prefixed with `label`. Checking paths is the caller's business.
 */
export async function* readTar(
  input: AsyncIterable<Buffer> | ByteSource,
  opts: ReadTarOptions = {},
): AsyncGenerator<TarEntry> {
  const relabel = (err: unknown): unknown =>
    opts.label && isKilnError(err, "INVALID_ARCHIVE")
      ? new KilnError("INVALID_ARCHIVE", `${opts.label}: ${err.message}`, { cause: err })
      : err;
  const src = isByteSource(input) ? input : new ByteReader(input);
  try {
    yield* entries(src, relabel);
  } catch (err) {
    throw relabel(err);
  } finally {
    await src.close();
  }
}

export function isByteSource(x: AsyncIterable<Buffer> | ByteSource): x is ByteSource {
  return typeof (x as ByteSource).take === "function";
}

/** Errors met while the caller reads an entry's data get the label too. */
async function* labeled(
  data: AsyncIterable<Buffer>,
  relabel: (err: unknown) => unknown,
): AsyncGenerator<Buffer> {
  try {
    yield* data;
  } catch (err) {
    throw relabel(err);
  }
}

async function* entries(src: ByteSource, relabel: (err: unknown) => unknown): AsyncGenerator<TarEntry> {
  const assembler = new HeaderAssembler();
  for (;;) {
    const at = src.position;
    const raw = await src.read(BLOCK_SIZE, `the header at offset ${at} is cut short`);
    const block = raw === null ? null : parseHeaderBlock(raw, `offset ${at}`);
    if (block === null) {
      if (assembler.pending) {
        throw invalid(
          `truncated archive: it ends after an extended header, without its entry (offset ${at})`,
        );
      }
      await src.drain();
      return;
    }
    if (isMetaEntry(block)) {
      HeaderAssembler.checkMetaSize(block, `offset ${at}`);
      const what = `the ${block.type} entry at offset ${at} is cut short`;
      assembler.absorb(block, Buffer.from(await src.readExact(block.size, what)));
      await src.skip(paddedSize(block.size) - block.size, what);
      continue;
    }
    const header = assembler.finish(block);
    const name = quoteBytes(header.path.slice(0, 200));
    if (header.path.includes("\0") || header.linkpath.includes("\0")) {
      throw invalid(`entry at offset ${at}: NUL byte in its name or link target`);
    }
    const cut = `entry ${name} at offset ${at} is cut short`;
    let dataSize = entryDataSize(header);
    let sparse: SparseMap | undefined;
    if (header.sparse) {
      const map = [...header.sparse.map];
      for (let more = header.sparse.isExtended; more; ) {
        const ext = parseSparseExtension(await src.readExact(BLOCK_SIZE, cut));
        map.push(...ext.map);
        more = ext.isExtended;
        if (map.length > MAX_SPARSE_REGIONS) throw invalid(`entry ${name}: sparse map too long`);
      }
      if (header.sparse.format === "pax-1.0") {
        const m = await readPax1Map(src, dataSize, `entry ${name}`);
        map.push(...m.map);
        dataSize -= m.bytes;
      }
      try {
        checkSparseMap(map, header.sparse.realSize, dataSize);
      } catch (err) {
        throw isKilnError(err) ? invalid(`entry ${name} at offset ${at}: ${err.message}`) : err;
      }
      sparse = { realSize: header.sparse.realSize, map };
    }
    const offset = src.position;
    const end = offset + dataSize;
    let asked = false;
    yield {
      header,
      offset,
      stored: dataSize,
      size: sparse ? sparse.realSize : dataSize,
      sparse,
      data: () => {
        if (asked || src.position !== offset) {
          throw new KilnError(
            "INTERNAL",
            `tar entry ${name}: data() called twice or after the reader moved on`,
          );
        }
        asked = true;
        return labeled(src.take(dataSize, cut), relabel);
      },
    };
    await src.skip(end - src.position, cut);
    // umoci insert 0.4.7 ends a layer right after the last entry's data: no padding, no end
    // blocks. The entry is complete, so such a stream ends here (GNU tar refuses it; registries
    // hold such layers).
    if (!(await src.skipToEnd(paddedSize(dataSize) - dataSize))) return;
  }
}
