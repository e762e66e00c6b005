/**
 * Inline ("ibody") xattrs: right after the inode, a 12-byte erofs_xattr_ibody_header (no shared
 * xattrs here) then erofs_xattr_entry records {name_len u8, name_index u8, value_size u16le, name
 * suffix, value}, each padded to 4 bytes. The name index stands for a well-known prefix.
 */
import { KilnError } from "../../errors.js";
import { compareNames } from "../tree.js";

const IBODY_HEADER_SIZE = 12;
/** The ibody of an inode without xattrs (nothing: xattr_icount 0). */
export const NO_XATTRS_IBODY = Buffer.alloc(0);
const ENTRY_HEADER_SIZE = 4;

/** Whole names first (ACLs have an empty suffix), then prefixes; EROFS_XATTR_INDEX_*. */
const EXACT: readonly [string, number][] = [
  ["system.posix_acl_access", 2],
  ["system.posix_acl_default", 3],
];
const PREFIXES: readonly [string, number][] = [
  ["user.", 1],
  ["trusted.", 4],
  ["lustre.", 5],
  ["security.", 6],
];

/** The (index, suffix) EROFS stores for a full xattr name; throws for prefixes it cannot hold. */
export function splitXattrName(name: string, where: string): { index: number; suffix: Buffer } {
  for (const [full, index] of EXACT) if (name === full) return { index, suffix: Buffer.alloc(0) };
  for (const [prefix, index] of PREFIXES) {
    if (name.startsWith(prefix)) {
      const suffix = Buffer.from(name.slice(prefix.length), "utf8");
      if (suffix.length > 255)
        throw new KilnError("UNSUPPORTED_ARCHIVE", `xattr name ${name} on ${where} is too long for EROFS`);
      return { index, suffix };
    }
  }
  throw new KilnError(
    "UNSUPPORTED_ARCHIVE",
    `xattr ${name} on ${where} has a prefix EROFS cannot store (user., trusted., security., system.posix_acl_*)`,
  );
}

const align4 = (n: number): number => (n + 3) & ~3;

/**
 * The encoded ibody of an inode's xattrs (empty when it has none), entries sorted by full name
 * so the output does not depend on insertion order.
 */
export function encodeXattrs(xattrs: ReadonlyMap<string, Buffer>, where: string): Buffer {
  if (xattrs.size === 0) return NO_XATTRS_IBODY;
  const entries = [...xattrs]
    .sort((a, b) => compareNames(a[0], b[0]))
    .map(([name, value]) => {
      if (value.length > 0xffff)
        throw new KilnError(
          "UNSUPPORTED_ARCHIVE",
          `xattr ${name} on ${where} has a ${value.length}-byte value; EROFS holds at most 65535`,
        );
      return { ...splitXattrName(name, where), value };
    });
  let size = IBODY_HEADER_SIZE;
  for (const e of entries) size += align4(ENTRY_HEADER_SIZE + e.suffix.length + e.value.length);
  if (size > IBODY_HEADER_SIZE + 4 * 0xfffe)
    throw new KilnError(
      "UNSUPPORTED_ARCHIVE",
      `xattrs of ${where} take ${size} bytes; EROFS holds at most 256 KiB`,
    );
  const buf = Buffer.alloc(size);
  // Header: h_name_filter (0: no filter feature), h_shared_count 0, reserved.
  let off = IBODY_HEADER_SIZE;
  for (const e of entries) {
    buf.writeUInt8(e.suffix.length, off);
    buf.writeUInt8(e.index, off + 1);
    buf.writeUInt16LE(e.value.length, off + 2);
    e.suffix.copy(buf, off + ENTRY_HEADER_SIZE);
    e.value.copy(buf, off + ENTRY_HEADER_SIZE + e.suffix.length);
    off += align4(ENTRY_HEADER_SIZE + e.suffix.length + e.value.length);
  }
  return buf;
}

/** i_xattr_icount for an ibody of `bytes` bytes (0 when there is none). */
export function xattrCount(bytes: number): number {
  if (bytes === 0) return 0;
  return 1 + (bytes - IBODY_HEADER_SIZE) / 4;
}
