/**
 * Layer entry names: cleaned lexically inside the image root (no symlink is ever consulted), and
 * the whiteout names of the OCI image spec (inherited from aufs).
 */
import { KilnError } from "../errors.js";
import { quoteBytes } from "../io/bytestring.js";

/** `.wh.NAME` removes NAME from lower layers. */
export const WHITEOUT_PREFIX = ".wh.";
/** `.wh..wh.*`: aufs metadata (`.wh..wh.plnk`, `.wh..wh.aufs`), never part of the image. */
export const WHITEOUT_META_PREFIX = ".wh..wh.";
/** In directory D: everything below D in lower layers is hidden. */
export const OPAQUE_MARKER = ".wh..wh..opq";

/** Linux NAME_MAX: no filesystem kiln writes can hold a longer name. */
const NAME_MAX = 255;

/**
 * `./a//b/../c/` → `["a", "c"]`; `/abs` → `["abs"]`; `../../etc/x` → `["etc", "x"]` (`..` stops at
 * the root, as extraction into a chroot would). `[]` is the root itself. Paths are byte strings
 * (src/io/bytestring.ts), so 255 characters are 255 bytes. A NUL byte or a component
 * longer than 255 bytes → INVALID_ARCHIVE; `what` names the path in the message.
 */
export function cleanPath(path: string, what = "path"): string[] {
  if (path.includes("\0")) {
    throw new KilnError("INVALID_ARCHIVE", `${what} ${quoteBytes(path)} contains a NUL byte`);
  }
  const out: string[] = [];
  for (const part of path.split("/")) {
    if (part === "" || part === ".") continue;
    if (part === "..") {
      out.pop();
      continue;
    }
    if (part.length > NAME_MAX) {
      throw new KilnError(
        "INVALID_ARCHIVE",
        `${what} ${quoteBytes(path.slice(0, 300))} has a component longer than ${NAME_MAX} bytes`,
      );
    }
    out.push(part);
  }
  return out;
}

export type NameKind =
  | { kind: "plain" }
  | { kind: "whiteout"; target: string }
  | { kind: "opaque" }
  | { kind: "meta" };

/** What a path's last component means to the layer merge. */
export function classifyName(name: string): NameKind {
  if (name === OPAQUE_MARKER) return { kind: "opaque" };
  if (name.startsWith(WHITEOUT_META_PREFIX)) return { kind: "meta" };
  if (name.startsWith(WHITEOUT_PREFIX))
    return { kind: "whiteout", target: name.slice(WHITEOUT_PREFIX.length) };
  return { kind: "plain" };
}
