/**
 * Indexes a tar file without reading member data: headers are read, data is seeked over. Image
 * archives (docker save, OCI archives) are read this way, so a layer is later streamed straight
 * from its offset in the file.
 */
import { type FileHandle, open } from "node:fs/promises";
import { posix } from "node:path";
import { isKilnError, KilnError } from "../errors.js";
import { quoteBytes } from "../io/bytestring.js";
import {
  BLOCK_SIZE,
  type EntryType,
  entryDataSize,
  HeaderAssembler,
  isMetaEntry,
  paddedSize,
  parseHeaderBlock,
  parseSparseExtension,
} from "./header.js";

export interface TarIndexEntry {
  /** The member name, normalized (see normalizeMemberName). */
  readonly name: string;
  /** Offset of the entry's (first) header block. */
  readonly headerOffset: number;
  /** Offset of the first data byte. */
  readonly offset: number;
  /** Data bytes in the archive (0 for links, directories, devices). */
  readonly size: number;
  readonly type: EntryType;
  readonly linkname: string;
  /** A GNU sparse file: the data is only its regions, not the file's bytes. */
  readonly sparse: boolean;
}

export interface ScanOptions {
  /** Names the archive in error messages (default: its path). */
  readonly label?: string | undefined;
}

/**
 * `./a//b/` → `a/b`: leading `./` and `/` dropped, `.` and `..` resolved (never above the root),
 * trailing slash dropped. The same member written by different tars gets the same key.
 */
export function normalizeMemberName(name: string): string {
  const n = posix.normalize(`/${name}`).slice(1);
  return n.endsWith("/") ? n.slice(0, -1) : n;
}

/** Reads a file through a window so the many small header reads of a tar cost few syscalls. */
class WindowReader {
  private window = Buffer.alloc(0);
  private windowStart = 0;

  constructor(
    private readonly fh: FileHandle,
    readonly fileSize: number,
    private readonly windowSize = 64 * 1024,
  ) {}

  /** Exactly `length` bytes at `offset`; the caller has checked they lie inside the file. */
  async read(offset: number, length: number): Promise<Buffer> {
    const end = offset + length;
    if (offset >= this.windowStart && end <= this.windowStart + this.window.length) {
      return this.window.subarray(offset - this.windowStart, end - this.windowStart);
    }
    const want = Math.min(Math.max(length, this.windowSize), this.fileSize - offset);
    const buf = Buffer.alloc(want);
    let got = 0;
    while (got < want) {
      const { bytesRead } = await this.fh.read(buf, got, want - got, offset + got);
      if (bytesRead === 0) break;
      got += bytesRead;
    }
    if (got < length) {
      throw new KilnError(
        "INVALID_ARCHIVE",
        `truncated archive: the file shrank while it was read (offset ${offset})`,
      );
    }
    this.window = buf.subarray(0, got);
    this.windowStart = offset;
    return this.window.subarray(0, length);
  }
}

function truncated(what: string, need: number, size: number): KilnError {
  return new KilnError(
    "INVALID_ARCHIVE",
    `truncated archive: ${what} needs bytes up to offset ${need} but the file ends at ${size}`,
  );
}

/**
 * Reads every header of a tar file and returns its members by normalized name (a later member of
 * the same name replaces an earlier one, as extraction would). Accepts an archive that ends without
 * the two zero blocks, at a header boundary. Bad checksums, bad numbers, meta entries with nothing
 * after them and members cut short → INVALID_ARCHIVE naming the archive.
 */
export async function scanTar(path: string, opts: ScanOptions = {}): Promise<Map<string, TarIndexEntry>> {
  const label = opts.label ?? path;
  const fh = await open(path, "r");
  try {
    const { size: fileSize } = await fh.stat();
    return await scanHandle(new WindowReader(fh, fileSize));
  } catch (err) {
    if (isKilnError(err, "INVALID_ARCHIVE")) {
      throw new KilnError("INVALID_ARCHIVE", `${label}: ${err.message}`, { cause: err });
    }
    throw err;
  } finally {
    await fh.close();
  }
}

async function scanHandle(reader: WindowReader): Promise<Map<string, TarIndexEntry>> {
  const entries = new Map<string, TarIndexEntry>();
  const assembler = new HeaderAssembler();
  const fileSize = reader.fileSize;
  let pos = 0;
  for (;;) {
    if (pos >= fileSize) break;
    if (pos + BLOCK_SIZE > fileSize)
      throw truncated(`the header at offset ${pos}`, pos + BLOCK_SIZE, fileSize);
    const block = parseHeaderBlock(await reader.read(pos, BLOCK_SIZE), `offset ${pos}`);
    if (block === null) break; // end-of-archive marker; whatever follows is not part of it
    let dataStart = pos + BLOCK_SIZE;
    if (isMetaEntry(block)) {
      HeaderAssembler.checkMetaSize(block, `offset ${pos}`);
      const end = dataStart + block.size;
      if (end > fileSize) throw truncated(`the ${block.type} entry at offset ${pos}`, end, fileSize);
      assembler.absorb(block, Buffer.from(await reader.read(dataStart, block.size)));
      pos = dataStart + paddedSize(block.size);
      continue;
    }
    const header = assembler.finish(block);
    const name = normalizeMemberName(header.path);
    if (header.sparse?.isExtended) {
      for (let more = true; more; ) {
        if (dataStart + BLOCK_SIZE > fileSize) {
          throw truncated(`the sparse map of ${quoteBytes(header.path)}`, dataStart + BLOCK_SIZE, fileSize);
        }
        more = parseSparseExtension(await reader.read(dataStart, BLOCK_SIZE)).isExtended;
        dataStart += BLOCK_SIZE;
      }
    }
    const size = entryDataSize(header);
    if (dataStart + size > fileSize)
      throw truncated(`member ${quoteBytes(header.path)}`, dataStart + size, fileSize);
    entries.delete(name); // keep Map order = archive order of the surviving entries
    entries.set(name, {
      name,
      headerOffset: pos,
      offset: dataStart,
      size,
      type: header.type,
      linkname: header.linkpath,
      sparse: header.sparse !== undefined,
    });
    pos = dataStart + paddedSize(size);
  }
  if (assembler.pending) {
    throw new KilnError(
      "INVALID_ARCHIVE",
      "truncated archive: it ends after an extended header, without its entry",
    );
  }
  return entries;
}
