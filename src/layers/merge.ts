/**
 * Merges the entries of image layers (bottom first) into one tree of src/fs/tree.ts, or builds one
 * tree per layer for overlayfs stacking. Only headers pass through here: a regular file becomes a
 * DataRef to its bytes in the layer stream, so memory grows with the number of entries, never with
 * their data.
 *
 * Semantics (DESIGN.md "Layer semantics"), and where kiln chose between tools:
 * - Each layer is first built as its own tree; at the layer's end that tree is merged onto the
 *   layers below. Whiteouts and opaque markers act at once on the lower tree only, so they never
 *   hide entries of their own layer, wherever they sit in the tar (OCI image spec).
 * - A later entry of a layer replaces an earlier one; a directory over a directory updates its
 *   metadata (xattrs replaced as a set, as umoci does) and keeps its children; any other
 *   replacement is whole.
 * - Parents missing from a tar are 0755 root:root at `fixedTime`; over an existing lower directory
 *   they change nothing. Whiteouts and opaque markers create their directory too (as containerd).
 * - Symlinks are never followed. containerd and umoci resolve a symlink in a parent path inside the
 *   root; kiln refuses instead: an entry below a non-directory (symlink, file, device) of its own or
 *   of a lower layer → INVALID_ARCHIVE naming the entry. Nothing is ever placed elsewhere.
 * - Entries naming the root (`./`) are ignored, as containerd does: the root is 0755 root:root.
 * - A hardlink names an earlier entry of its layer or, as containerd allows, a non-directory of the
 *   lower layers as they stand at that point of the tar; all names share one Inode (the target's
 *   metadata). Files in aufs `.wh..wh.plnk` are kept out of the tree but may be link targets.
 */
import { KilnError } from "../errors.js";
import { type Extent, type Inode, inodeOf, NO_XATTRS, newInode } from "../fs/tree.js";
import { quoteBytes } from "../io/bytestring.js";
import type { TarHeader } from "../tar/header.js";
import { classifyName, cleanPath, WHITEOUT_META_PREFIX, WHITEOUT_PREFIX } from "./paths.js";

/** One entry of a layer as the streaming tar reader delivers it. */
export interface LayerEntry {
  readonly header: TarHeader;
  /** Offset of the entry's data in the layer's uncompressed stream. */
  readonly offset: number;
  /** Data bytes stored in the archive (after a PAX 1.0 sparse map, which the reader consumes). */
  readonly stored: number;
  /**
   * Sparse files: the data regions in stored order, as a list or as src/tar/reader.ts's SparseMap
   * (`{ map }`); default: the map in the header (not possible for PAX 1.0, whose map is in the data).
   */
  readonly sparse?: readonly Extent[] | { readonly map: readonly Extent[] } | undefined;
}

export interface MergeOptions {
  /** Seconds since the epoch for the root and for parents missing from a tar. */
  readonly fixedTime: number;
}

export interface LayerTreeOptions extends MergeOptions {
  /**
   * The merged layers below this one. A directory this layer needs but does not list then takes the
   * lower directory's mode, owner, time and xattrs: overlayfs shows a directory's attributes from
   * the topmost layer that has it, so a made-up 0755 root:root parent would hide the real one.
   */
  readonly parentsFrom?: Inode | undefined;
}

/** Pushes the entries of one layer, in tar order; `close` ends the layer. */
export interface LayerSink {
  add(entry: LayerEntry): void;
  close(): void;
}

export type Entries = Iterable<LayerEntry> | AsyncIterable<LayerEntry>;

export const OVERLAY_OPAQUE_XATTR = "trusted.overlay.opaque";
const OVERLAY_XATTR_PREFIX = "trusted.overlay.";

function invalid(layer: number, message: string): KilnError {
  return new KilnError("INVALID_ARCHIVE", `layer ${layer}: ${message}`);
}

function implicitDir(fixedTime: number): Inode {
  return newInode("directory", { mode: 0o755, uid: 0, gid: 0, mtime: fixedTime, mtimeNsec: 0 });
}

const q = quoteBytes;

/**
 * Flattened mode: N layers into one tree. Call `addLayer` (or `openLayer`/`close`) once per layer,
 * bottom first, then `finish`.
 */
export class TreeBuilder {
  readonly #root: Inode;
  readonly #fixedTime: number;
  #lastLayer = -1;
  #open = false;
  #finished = false;

  constructor(opts: MergeOptions) {
    this.#fixedTime = opts.fixedTime;
    this.#root = implicitDir(opts.fixedTime);
  }

  /** Starts the next layer (indexes strictly increasing); entries go in with `add`. */
  openLayer(layerIndex: number): LayerSink {
    if (this.#open || this.#finished || !(layerIndex > this.#lastLayer)) {
      throw new KilnError(
        "INTERNAL",
        `TreeBuilder: layer ${layerIndex} opened out of order (last ${this.#lastLayer}${this.#open ? ", one still open" : ""})`,
      );
    }
    this.#open = true;
    this.#lastLayer = layerIndex;
    const state = new LayerState(layerIndex, this.#fixedTime, this.#root);
    let closed = false;
    return {
      add: (entry) => {
        if (closed) throw new KilnError("INTERNAL", `TreeBuilder: layer ${layerIndex} is closed`);
        state.add(entry);
      },
      close: () => {
        if (closed) return;
        closed = true;
        this.#open = false;
        state.mergeInto(this.#root, state.root, "");
      },
    };
  }

  async addLayer(layerIndex: number, entries: Entries): Promise<void> {
    const sink = this.openLayer(layerIndex);
    try {
      await feed(entries, sink);
    } catch (err) {
      // The tree is half-merged now: this builder must not be used any more.
      this.#finished = true;
      throw err;
    }
    sink.close();
  }

  /** The tree merged so far (the layers whose sinks were closed); the builder keeps changing it. */
  get current(): Inode {
    return this.#root;
  }

  /** The merged root. The builder is done after this. */
  finish(): Inode {
    if (this.#open) throw new KilnError("INTERNAL", "TreeBuilder: finish with a layer still open");
    this.#finished = true;
    return this.#root;
  }
}

/**
 * Per-layer mode, for overlayfs: one layer alone. `.wh.NAME` becomes an overlayfs whiteout (a char
 * device 0:0, mode 0) or, when the layer also has a directory NAME, makes that directory opaque;
 * `.wh..wh..opq` in D sets `trusted.overlay.opaque=y` on D, except at the root, where it becomes a
 * whiteout of each name of `parentsFrom`'s root. `trusted.overlay.*` xattrs from the tar
 * itself are dropped: they would change how overlayfs reads the layer. A hardlink can only name an
 * entry of this layer.
 */
export async function buildLayerTree(
  layerIndex: number,
  entries: Entries,
  opts: LayerTreeOptions,
): Promise<Inode> {
  const sink = openLayerTree(layerIndex, opts);
  await feed(entries, sink);
  return sink.close();
}

/** Push form of buildLayerTree: `close` returns the layer's root. */
export function openLayerTree(
  layerIndex: number,
  opts: LayerTreeOptions,
): { add(entry: LayerEntry): void; close(): Inode } {
  // The lower root's names as they are now: a flattened sink fed the same entries may empty it.
  const lowerRootNames = [...(opts.parentsFrom?.entries?.keys() ?? [])];
  const state = new LayerState(layerIndex, opts.fixedTime, undefined, opts.parentsFrom, lowerRootNames);
  return { add: (entry) => state.add(entry), close: () => state.finishOverlay() };
}

async function feed(entries: Entries, sink: { add(entry: LayerEntry): void }): Promise<void> {
  if (Symbol.iterator in entries) {
    for (const entry of entries) sink.add(entry);
  } else {
    for await (const entry of entries) sink.add(entry);
  }
}

/** One layer being read: its own tree, plus (flattened mode) the lower tree it acts on. */
class LayerState {
  readonly root: Inode;
  /** Directories this layer did not list: the path of the entry that needed each one. */
  readonly #implicit = new Map<Inode, string>();
  /** aufs `.wh..wh.plnk/*` files: not in the tree, but hardlink targets. */
  readonly #hidden = new Map<string, Inode>();
  /** Per-layer mode: whiteouts and opaque directories, applied at the end (order-independent). */
  readonly #whiteouts = new Map<string, string[]>();
  readonly #opaque = new Map<string, string[]>();

  constructor(
    readonly layer: number,
    readonly fixedTime: number,
    /** The merged lower layers (flattened mode); undefined in per-layer mode. */
    readonly lower: Inode | undefined,
    /** Per-layer mode: LayerTreeOptions.parentsFrom. */
    readonly parentsFrom?: Inode | undefined,
    /** Per-layer mode: the names at parentsFrom's root when the layer began (for an opaque root). */
    readonly lowerRootNames: readonly string[] = [],
  ) {
    this.root = implicitDir(fixedTime);
  }

  get perLayer(): boolean {
    return this.lower === undefined;
  }

  add(entry: LayerEntry): void {
    const h = entry.header;
    if (
      h.type === "pax" ||
      h.type === "pax-global" ||
      h.type === "gnu-longname" ||
      h.type === "gnu-longlink"
    ) {
      return; // folded into the next header by the reader; nothing to place
    }
    const comps = cleanPath(h.path, `layer ${this.layer}: entry`);
    const path = comps.join("/");
    if (comps.length === 0) {
      if (h.type === "directory") return;
      throw invalid(this.layer, `entry ${q(h.path)} (${h.type}) names the root directory`);
    }
    const metaAt = comps.findIndex((c) => c.startsWith(WHITEOUT_META_PREFIX));
    const name = comps[comps.length - 1]!;
    const kind = classifyName(name);
    if (metaAt >= 0 && !(metaAt === comps.length - 1 && kind.kind === "opaque")) {
      if (h.type === "file") this.#hidden.set(path, this.#makeInode(entry, path));
      return; // aufs bookkeeping, not part of the image
    }
    for (let i = 0; i < comps.length - 1; i++) {
      if (comps[i]!.startsWith(WHITEOUT_PREFIX)) {
        throw invalid(this.layer, `entry ${q(path)} lies below a whiteout name ${q(comps[i])}`);
      }
    }
    const parentComps = comps.slice(0, -1);
    if (kind.kind === "opaque") {
      this.#ensureDir(parentComps, path);
      if (!this.perLayer) this.#lowerDir(parentComps)?.entries?.clear();
      else if (parentComps.length > 0) this.#opaque.set(parentComps.join("/"), parentComps);
      else {
        // overlayfs ignores trusted.overlay.opaque on a lower layer's root: a whiteout of every name
        // below says it instead.
        for (const name of this.lowerRootNames) this.#whiteouts.set(name, [name]);
      }
      return;
    }
    if (kind.kind === "whiteout") {
      const target = kind.target;
      if (target === "" || target === "." || target === "..") {
        throw invalid(this.layer, `bad whiteout name ${q(path)}`);
      }
      this.#ensureDir(parentComps, path);
      if (this.perLayer) this.#whiteouts.set([...parentComps, target].join("/"), [...parentComps, target]);
      else this.#lowerDir(parentComps)?.entries?.delete(target);
      return;
    }

    const node = h.type === "hardlink" ? this.#linkTarget(h.linkpath, path) : this.#makeInode(entry, path);
    const parent = this.#ensureDir(parentComps, path);
    const existing = parent.entries!.get(name);
    if (node.type === "directory" && existing?.type === "directory") {
      copyDirMeta(node, existing);
      this.#implicit.delete(existing);
      return;
    }
    parent.entries!.set(name, node);
  }

  /** Walks this layer's tree, creating missing directories; a non-directory on the way → INVALID_ARCHIVE. */
  #ensureDir(comps: readonly string[], entryPath: string): Inode {
    let dir = this.root;
    for (let i = 0; i < comps.length; i++) {
      let child = dir.entries!.get(comps[i]!);
      if (child === undefined) {
        child = implicitDir(this.fixedTime);
        this.#implicit.set(child, entryPath);
        dir.entries!.set(comps[i]!, child);
      } else if (child.type !== "directory") {
        throw notADirectory(this.layer, entryPath, comps.slice(0, i + 1).join("/"), child.type, "");
      }
      dir = child;
    }
    return dir;
  }

  /** The lower tree's directory at `comps`, if there is one (symlinks are not followed). */
  #lowerDir(comps: readonly string[]): Inode | undefined {
    let dir = this.lower;
    for (const c of comps) {
      const child = dir?.entries?.get(c);
      if (child?.type !== "directory") return undefined;
      dir = child;
    }
    return dir;
  }

  /**
   * A hardlink's target: an earlier entry of this layer, else (flattened mode) a lower-layer entry
   * still visible at this point of the tar. Never a directory.
   */
  #linkTarget(linkpath: string, path: string): Inode {
    const comps = cleanPath(linkpath, `layer ${this.layer}: hardlink ${q(path)} target`);
    const key = comps.join("/");
    let found = this.#hidden.get(key);
    if (found === undefined && comps.length > 0) {
      let mine: Inode | undefined = this.root;
      let lower: Inode | undefined = this.lower;
      for (let i = 0; i < comps.length; i++) {
        const c = comps[i]!;
        const m: Inode | undefined = mine?.entries?.get(c);
        const l: Inode | undefined = lower?.entries?.get(c);
        if (i === comps.length - 1) {
          found = m ?? l;
          break;
        }
        // A non-directory of this layer replaces the whole lower subtree.
        if (m !== undefined && m.type !== "directory") break;
        mine = m;
        lower = l?.type === "directory" ? l : undefined;
      }
    }
    if (found === undefined) {
      throw invalid(
        this.layer,
        `hardlink ${q(path)} names ${q(linkpath)}, which is not an earlier entry of this layer${this.perLayer ? "" : " nor a file of a lower layer"}`,
      );
    }
    if (found.type === "directory") {
      throw invalid(this.layer, `hardlink ${q(path)} names a directory ${q(linkpath)}`);
    }
    return found;
  }

  #makeInode(entry: LayerEntry, path: string): Inode {
    const h = entry.header;
    // No map of its own when there is nothing in it (NO_XATTRS: replaced, never modified).
    let xattrs = NO_XATTRS;
    if (h.xattrs.size > 0) {
      for (const [k, v] of h.xattrs) {
        if (this.perLayer && k.startsWith(OVERLAY_XATTR_PREFIX)) continue;
        if (xattrs === NO_XATTRS) xattrs = new Map();
        xattrs.set(k, v);
      }
    }
    // The inode is the only object made here (besides a file's DataRef): this runs for every
    // entry of every layer, and spread copies of the attributes once were most of what pass 1
    // allocated (and, surviving young-generation collections, most of its peak heap).
    const type = h.type;
    switch (type) {
      case "file":
      case "directory":
      case "char":
      case "block":
      case "fifo":
      case "symlink":
        break;
      default:
        throw new KilnError(
          "UNSUPPORTED_ARCHIVE",
          `layer ${this.layer}: entry ${q(path)} has tar type ${JSON.stringify(h.typeflag)}, which kiln does not know how to place`,
        );
    }
    const inode = inodeOf(type, h.mode & 0o7777, h.uid, h.gid, h.mtime, h.mtimeNsec, xattrs);
    if (type === "file") {
      this.#setFileData(inode, entry, path);
    } else if (type === "symlink") {
      if (h.linkpath === "" || h.linkpath.includes("\0")) {
        throw invalid(
          this.layer,
          `symlink ${q(path)} has ${h.linkpath === "" ? "an empty target" : "a NUL byte in its target"}`,
        );
      }
      // Linux symlinks are always 0777; what the header says is meaningless.
      inode.mode = 0o777;
      inode.target = h.linkpath;
      inode.size = h.linkpath.length; // a byte string: one character a byte
    } else if (type === "char" || type === "block") {
      inode.rdevMajor = h.devmajor;
      inode.rdevMinor = h.devminor;
    }
    return inode;
  }

  #setFileData(inode: Inode, entry: LayerEntry, path: string): void {
    const h = entry.header;
    const size = h.sparse ? h.sparse.realSize : h.size;
    let sparse: readonly Extent[] | undefined;
    if (h.sparse) {
      const given = entry.sparse;
      if (given === undefined) sparse = h.sparse.format === "pax-1.0" ? undefined : h.sparse.map;
      else sparse = isExtentList(given) ? given : given.map;
      if (sparse === undefined) {
        throw new KilnError("INTERNAL", `layer ${this.layer}: sparse entry ${q(path)} came without its map`);
      }
      let total = 0;
      let end = 0;
      for (const e of sparse) {
        // Writers place regions in one forward pass: ascending and disjoint, or refused here.
        if (e.offset < end) {
          throw invalid(
            this.layer,
            `sparse file ${q(path)} has a region at ${e.offset} before the end ${end} of the last`,
          );
        }
        end = e.offset + e.size;
        if (e.offset + e.size > size) {
          throw invalid(this.layer, `sparse file ${q(path)} has a region beyond its size ${size}`);
        }
        total += e.size;
      }
      if (total !== entry.stored) {
        throw invalid(
          this.layer,
          `sparse file ${q(path)}: its map covers ${total} bytes, ${entry.stored} are stored`,
        );
      }
    } else if (entry.sparse) {
      throw new KilnError(
        "INTERNAL",
        `layer ${this.layer}: entry ${q(path)} has a sparse map but no sparse header`,
      );
    }
    inode.size = size;
    if (size > 0) inode.data = { layer: this.layer, offset: entry.offset, stored: entry.stored, sparse };
  }

  /** Flattened mode, at the layer's end: this layer's tree (`dir`, at `path`) onto the lower `into`. */
  mergeInto(into: Inode, dir: Inode, path: string): void {
    for (const [name, upper] of dir.entries!) {
      const here = path === "" ? name : `${path}/${name}`;
      const lower = into.entries!.get(name);
      if (upper.type === "directory" && lower !== undefined) {
        const implicitFor = this.#implicit.get(upper);
        if (lower.type === "directory") {
          if (implicitFor === undefined) copyDirMeta(upper, lower);
          this.mergeInto(lower, upper, here);
          continue;
        }
        if (implicitFor !== undefined) {
          throw notADirectory(this.layer, implicitFor, here, lower.type, " of a lower layer");
        }
      }
      into.entries!.set(name, upper);
    }
  }

  /** Per-layer mode, at the layer's end: whiteouts and opaque markers in overlayfs form. */
  finishOverlay(): Inode {
    for (const comps of this.#whiteouts.values()) {
      const parent = this.#dirAt(comps.slice(0, -1));
      if (parent === undefined) continue; // replaced later in the layer by a non-directory
      const name = comps[comps.length - 1]!;
      const existing = parent.entries!.get(name);
      if (existing === undefined) {
        parent.entries!.set(name, newInode("char", { mode: 0, mtime: this.fixedTime }));
      } else if (existing.type === "directory") {
        // NAME is both removed from below and listed by this layer: an opaque directory says that.
        this.#opaque.set(comps.join("/"), comps);
      }
    }
    if (this.parentsFrom) this.#inheritParents(this.root, this.parentsFrom, "");
    for (const comps of this.#opaque.values()) {
      const dir = this.#dirAt(comps);
      // A new map: the directory's may be shared (with a lower layer's inode, or NO_XATTRS).
      if (dir) dir.xattrs = new Map(dir.xattrs).set(OVERLAY_OPAQUE_XATTR, Buffer.from("y"));
    }
    return this.root;
  }

  /**
   * Gives each directory this layer made up the metadata of the lower directory at its path, unless
   * a whiteout or an opaque marker of this layer removed that one (then it is new, as when flattened).
   */
  #inheritParents(dir: Inode, lower: Inode | undefined, path: string): void {
    for (const [name, child] of dir.entries!) {
      if (child.type !== "directory") continue;
      const here = path === "" ? name : `${path}/${name}`;
      const below = this.#whiteouts.has(here) ? undefined : lower?.entries?.get(name);
      const lowerDir = below?.type === "directory" ? below : undefined;
      if (lowerDir && this.#implicit.has(child)) {
        copyDirMeta(lowerDir, child);
        child.xattrs = new Map([...lowerDir.xattrs].filter(([k]) => !k.startsWith(OVERLAY_XATTR_PREFIX)));
      }
      this.#inheritParents(child, this.#opaque.has(here) ? undefined : lowerDir, here);
    }
  }

  #dirAt(comps: readonly string[]): Inode | undefined {
    let dir: Inode | undefined = this.root;
    for (const c of comps) {
      dir = dir?.entries?.get(c);
      if (dir?.type !== "directory") return undefined;
    }
    return dir;
  }
}

function isExtentList(s: readonly Extent[] | { readonly map: readonly Extent[] }): s is readonly Extent[] {
  return Array.isArray(s);
}

function copyDirMeta(from: Inode, to: Inode): void {
  to.mode = from.mode;
  to.uid = from.uid;
  to.gid = from.gid;
  to.mtime = from.mtime;
  to.mtimeNsec = from.mtimeNsec;
  to.xattrs = from.xattrs;
}

function notADirectory(layer: number, entryPath: string, at: string, type: string, where: string): KilnError {
  return invalid(
    layer,
    `entry ${q(entryPath)} lies below ${q(at)}, a ${type}${where}, not a directory (symlinks are not followed)`,
  );
}
