/**
 * The cpio "newc" format (magic 070701), the one the kernel's initramfs unpacker reads: a 110-byte
 * ASCII header of 13 eight-digit hex fields, the NUL-terminated name, zeros up to a multiple of 4,
 * then the data, zeros up to a multiple of 4. The archive ends with an entry named TRAILER!!!.
 */
import { KilnError } from "../../errors.js";
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
  /** UTF-8 bytes of the path, without the NUL. */
  name: Buffer;
}

/** Zero bytes needed after `size` bytes to reach a multiple of 4. */
export function pad4(size: number): number {
  return (4 - (size % 4)) % 4;
}

function hex8(value: number, field: string, name: Buffer): string {
  if (!Number.isInteger(value) || value < 0 || value > MAX_FIELD) {
    throw new KilnError(
      "INVALID_ARGUMENT",
      `cpio: ${field} ${value} of /${name.toString("utf8")} does not fit a newc header field (0..${MAX_FIELD})`,
    );
  }
  return value.toString(16).padStart(8, "0");
}

/**
 * Header, name, NUL and padding of one entry, ready to write; the entry's data (filesize bytes)
 * and its padding follow. c_devmajor/c_devminor (the filesystem holding the file) are 0: with ino
 * they only key hardlink groups, and one archive is one filesystem. c_check is 0 (no CRC in newc).
 */
export function encodeEntry(e: NewcEntry): Buffer {
  if (e.name.includes(0)) {
    throw new KilnError("INVALID_ARGUMENT", `cpio: name /${e.name.toString("utf8")} contains a NUL byte`);
  }
  const namesize = e.name.length + 1;
  const fields = [
    e.ino,
    e.mode,
    e.uid,
    e.gid,
    e.nlink,
    e.mtime,
    e.filesize,
    0,
    0,
    e.rdevMajor,
    e.rdevMinor,
    namesize,
    0,
  ];
  const labels = [
    "ino",
    "mode",
    "uid",
    "gid",
    "nlink",
    "mtime",
    "size",
    "devmajor",
    "devminor",
    "rdevmajor",
    "rdevminor",
    "namesize",
    "check",
  ];
  let ascii = NEWC_MAGIC;
  for (let i = 0; i < fields.length; i++) ascii += hex8(fields[i]!, labels[i]!, e.name);
  const total = HEADER_SIZE + namesize + pad4(HEADER_SIZE + namesize);
  const out = Buffer.alloc(total);
  out.write(ascii, 0, "latin1");
  e.name.copy(out, HEADER_SIZE);
  return out;
}

/** The closing entry: a header with nlink 1 and every other field 0, named TRAILER!!!. */
export function encodeTrailer(): Buffer {
  return encodeEntry({
    ino: 0,
    mode: 0,
    uid: 0,
    gid: 0,
    nlink: 1,
    mtime: 0,
    filesize: 0,
    rdevMajor: 0,
    rdevMinor: 0,
    name: Buffer.from(TRAILER_NAME, "latin1"),
  });
}
