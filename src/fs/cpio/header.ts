/**
 * The cpio "newc" format (magic 070701), the one the kernel's initramfs unpacker reads: a 110-byte
 * ASCII header of 13 eight-digit hex fields, the NUL-terminated name, zeros up to a multiple of 4,
 * then the data, zeros up to a multiple of 4. The archive ends with an entry named TRAILER!!!.
 */
import { KilnError } from "../../errors.js";
import { showBytes } from "../../io/bytestring.js";
import { type FileType, modeWord } from "../tree.js";

export const NEWC_MAGIC = "070701";
export const HEADER_SIZE = 110;
export const TRAILER_NAME = "TRAILER!!!";
/** Largest value of a header field: 8 hex digits. File sizes above it cannot be stored. */
export const MAX_FIELD = 0xffffffff;
/**
 * The kernel's unpacker skips an entry whose name (with its NUL) or symlink target is longer than
 * PATH_MAX = 4096 bytes (init/initramfs.c, do_header): such paths are refused rather than lost.
 */
export const KERNEL_PATH_MAX = 4096;

export function modeField(type: FileType, perm: number): number {
  return modeWord(type, perm);
}

export interface NewcEntry {
  ino: number;
  /** Type bits | permission bits (modeField). */
  mode: number;
  uid: number;
  gid: number;
  nlink: number;
  mtime: number;
  filesize: number;
  rdevMajor: number;
  rdevMinor: number;
  /** The path, a byte string (src/io/bytestring.ts), without the NUL. */
  name: string;
}

/** Largest encoded header: the fixed part, a name of PATH_MAX bytes with its NUL, and padding. */
export const MAX_HEADER = HEADER_SIZE + KERNEL_PATH_MAX + 3;

/** Zero bytes needed after `size` bytes to reach a multiple of 4. */
export function pad4(size: number): number {
  return (4 - (size % 4)) % 4;
}

const HEX_DIGITS = Buffer.from("0123456789abcdef", "latin1");
const MAGIC = Buffer.from(NEWC_MAGIC, "latin1");
/** The 13 fields in header order, for messages. */
const LABELS = "ino mode uid gid nlink mtime size devmajor devminor rdevmajor rdevminor namesize check".split(
  " ",
);

/** Writes field `index` as 8 lowercase hex digits (no string built: one header per entry adds up). */
function hex8(out: Buffer, index: number, value: number, name: string): void {
  if (!Number.isInteger(value) || value < 0 || value > MAX_FIELD) {
    throw new KilnError(
      "INVALID_ARGUMENT",
      `cpio: ${LABELS[index]} ${value} of /${showBytes(name)} does not fit a newc header field (0..${MAX_FIELD})`,
    );
  }
  const at = NEWC_MAGIC.length + 8 * index;
  for (let i = 7; i >= 0; i--) {
    out[at + i] = HEX_DIGITS[value & 15]!;
    value >>>= 4;
  }
}

/**
 * Writes the header, name, NUL and padding of one entry into `out` (at least MAX_HEADER bytes, or
 * enough for this name) and returns their length; the entry's data (filesize bytes) and its padding
 * follow. c_devmajor/c_devminor (the filesystem holding the file) are 0: with ino they only key
 * hardlink groups, and one archive is one filesystem. c_check is 0 (no CRC in newc).
 */
export function encodeEntry(e: NewcEntry, out: Buffer): number {
  if (e.name.includes("\0")) {
    throw new KilnError("INVALID_ARGUMENT", `cpio: name /${showBytes(e.name)} contains a NUL byte`);
  }
  const nameLength = e.name.length; // a byte string: one character a byte
  const namesize = nameLength + 1;
  const total = HEADER_SIZE + namesize + pad4(HEADER_SIZE + namesize);
  if (total > out.length) {
    throw new KilnError("INTERNAL", `cpio: no room for the header of /${showBytes(e.name.slice(0, 80))}`);
  }
  out.write(e.name, HEADER_SIZE, "latin1");
  MAGIC.copy(out, 0);
  const fields = [e.ino, e.mode, e.uid, e.gid, e.nlink, e.mtime, e.filesize, 0, 0, e.rdevMajor, e.rdevMinor];
  for (let i = 0; i < fields.length; i++) hex8(out, i, fields[i]!, e.name);
  hex8(out, 11, namesize, e.name);
  hex8(out, 12, 0, e.name);
  out.fill(0, HEADER_SIZE + nameLength, total);
  return total;
}

/** The closing entry: a header with nlink 1 and every other field 0, named TRAILER!!!. */
export function encodeTrailer(out: Buffer): number {
  return encodeEntry(
    {
      ino: 0,
      mode: 0,
      uid: 0,
      gid: 0,
      nlink: 1,
      mtime: 0,
      filesize: 0,
      rdevMajor: 0,
      rdevMinor: 0,
      name: TRAILER_NAME,
    },
    out,
  );
}
