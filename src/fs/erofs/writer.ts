/**
 * Writes a tree as an uncompressed EROFS image (4 KiB blocks). The layout is computed first
 * (layout.ts); then the superblock, the slots of inodes without file data and directory/symlink
 * blocks are written, and finally file contents stream in dataOrder as two sequential streams per
 * layer: each file's full blocks to the data area, and its slot (inode, xattrs, tail) to the files'
 * part of the metadata area, laid out in that same order. A sparse file is chunk-based (chunks.ts):
 * its data regions go to its stored chunks and its slot carries the block map. All-zero blocks are
 * skipped: the output is sparse. Nothing depends on the clock: UUID and times come from the caller
 * and the tree.
 */
import { writeSync } from "node:fs";
import { type FileHandle, open } from "node:fs/promises";
import { KilnError } from "../../errors.js";
import { DataStream, openDirect } from "../datastream.js";
import { layerRuns, writeRuns } from "../layer-runs.js";
import { regionPieces } from "../sparse.js";
import type { ContentSource, Inode } from "../tree.js";
import { blockMap, type ChunkPlan, chunkOf, chunkPosition } from "./chunks.js";
import { encodeDirBlock } from "./dirent.js";
import { encodeInode, modeBits } from "./inode.js";
import { inodeSize, type Layout, type Node, nidOf, pathOf, planLayout } from "./layout.js";
import { BLOCK_SIZE, encodeSuperblockBlock, FEATURE_INCOMPAT_CHUNKED_FILE } from "./superblock.js";
import { xattrCount } from "./xattr.js";

export interface ErofsOptions {
  /** Filesystem UUID, 16 bytes (derived from the image digest by the caller). */
  uuid: Buffer;
  /** Volume label, at most 16 bytes of UTF-8. */
  volumeName?: string;
  /** Time compact inodes report; default: the most common mtime in the tree. */
  buildTime?: number;
  /** Store files' last partial block after their inode (default true). */
  inlineData?: boolean;
}

const SMALL_WRITE = 64 * 1024;

/**
 * Writes buf at `position`. Small writes go straight to the kernel: a thread-pool round trip per
 * inline tail or directory block would cost more than the write itself.
 */
async function writeAt(fh: FileHandle, buf: Buffer, position: number): Promise<void> {
  let done = 0;
  if (buf.length <= SMALL_WRITE) {
    while (done < buf.length) done += writeSync(fh.fd, buf, done, buf.length - done, position + done);
    return;
  }
  while (done < buf.length) {
    const { bytesWritten } = await fh.write(buf, done, buf.length - done, position + done);
    done += bytesWritten;
  }
}

/** Reused for slots: a buffer per inode adds up to 100k+ small allocations on a big image. */
class SlotBuffer {
  #buf = Buffer.alloc(BLOCK_SIZE);

  /** Zeroed room for `n` bytes. */
  take(n: number): Buffer {
    if (n > this.#buf.length) this.#buf = Buffer.alloc(n);
    return this.#buf.fill(0, 0, n).subarray(0, n);
  }
}

/**
 * One slot into `slots`: the inode, its xattrs, and its inline tail when it is a directory's or
 * symlink's (a file's tail is not included: it arrives with the file's bytes).
 */
function encodeSlot(node: Node, slots: SlotBuffer): Buffer {
  const isize = inodeSize(node);
  const fileTail = node.inode.type === "file" ? node.tail : 0;
  const buf = slots.take(isize + node.xattrs.length + node.tail - fileTail);
  const { inode } = node;
  encodeInode(
    {
      extended: node.extended,
      layout: node.layout,
      xattrCount: xattrCount(node.xattrs.length),
      mode: modeOf(inode),
      nlink: node.nlink,
      size: node.size,
      u: node.u,
      ino: node.ino,
      uid: inode.uid,
      gid: inode.gid,
      mtime: inode.mtime,
      mtimeNsec: inode.mtimeNsec,
    },
    buf,
    0,
  );
  node.xattrs.copy(buf, isize);
  const tailAt = isize + node.xattrs.length;
  if (node.tail > 0 && node.dir) {
    const { entries, plan } = node.dir;
    const last = plan.starts.length - 1;
    encodeDirBlock(entries, plan.starts[last]!, entries.length, buf, tailAt);
  } else if (node.tail > 0 && node.target) {
    node.target.copy(buf, tailAt);
  }
  return buf;
}

const modeOf = (inode: Inode): number => modeBits(inode.type, inode.mode);

/** The slots of inodes without file data, the first part of the metadata area, in order. */
async function writeMeta(fh: FileHandle, layout: Layout): Promise<void> {
  const base = layout.metaBlkaddr * BLOCK_SIZE;
  const slots = new SlotBuffer();
  const stream = new DataStream(fh, base);
  for (const node of layout.nodes) {
    if (node.inode.type === "file" && node.inode.data) continue; // with the file's bytes
    await stream.seek(base + node.offset);
    await stream.put(encodeSlot(node, slots));
  }
  await stream.end();
}

/** Full blocks of directories and of symlinks that do not fit their slot. */
async function writeDirAndLinkBlocks(fh: FileHandle, layout: Layout): Promise<void> {
  for (const node of layout.nodes) {
    if (node.blocks === 0) continue;
    if (node.dir) {
      const { entries, plan } = node.dir;
      const buf = Buffer.alloc(node.blocks * BLOCK_SIZE);
      for (let b = 0; b < node.blocks; b++) {
        const to = b + 1 < plan.starts.length ? plan.starts[b + 1]! : entries.length;
        encodeDirBlock(entries, plan.starts[b]!, to, buf, b * BLOCK_SIZE);
      }
      await writeAt(fh, buf, node.u * BLOCK_SIZE);
    } else if (node.target) {
      await writeAt(fh, node.target, node.u * BLOCK_SIZE);
    }
  }
}

/**
 * Streams file contents: full blocks to the data area, the slot and its tail to the metadata area.
 * Both areas hold files in dataOrder, so each layer's files are a run in each (written at once:
 * layer-runs.ts).
 */
async function writeContents(
  fh: FileHandle,
  layout: Layout,
  content: ContentSource,
  direct: FileHandle | undefined,
): Promise<void> {
  const metaBase = layout.metaBlkaddr * BLOCK_SIZE;
  await writeRuns(layerRuns(layout.files), async (files, stopped) => {
    // A run's own: a slot may still be being copied while another run encodes one.
    const slots = new SlotBuffer();
    // Opened at the run's first file with full blocks (a run of small files may have none).
    let stream: DataStream | undefined;
    const meta = new DataStream(fh, metaBase + layout.byInode.get(files[0]!)!.offset);
    let index = 0;
    try {
      // Transient: every chunk is copied (into the data stream or the tail) before the next is asked for.
      for await (const { inode, data } of content.contents(files, { transient: true })) {
        if (stopped()) break;
        const node = layout.byInode.get(inode);
        if (inode !== files[index] || !node)
          throw new KilnError("INTERNAL", "content source delivered files out of dataOrder");
        index++;
        if (node.chunks) {
          await meta.seek(metaBase + node.offset);
          await meta.put(encodeSlot(node, slots));
          for (const piece of blockMap(node.chunks)) await meta.put(piece);
          if (node.blocks > 0) stream ??= new DataStream(fh, node.chunks.start * BLOCK_SIZE, direct);
          await writeChunks(node, node.chunks, data, stream);
          continue;
        }
        const size = node.size;
        const inBlocks = node.tail > 0 ? node.blocks * BLOCK_SIZE : size;
        // The slot goes first; the tail, the file's last bytes, follows it in the same stream.
        await meta.seek(metaBase + node.offset);
        await meta.put(encodeSlot(node, slots));
        if (inBlocks > 0) {
          stream ??= new DataStream(fh, node.u * BLOCK_SIZE, direct);
          await stream.seek(node.u * BLOCK_SIZE);
        }
        let pos = 0;
        for await (const chunk of data) {
          if (pos + chunk.length > size)
            throw new KilnError(
              "INVALID_ARCHIVE",
              `content of /${pathOf(node)} is longer than its ${size} bytes`,
            );
          const split = Math.max(0, Math.min(chunk.length, inBlocks - pos));
          if (split > 0) await stream!.put(chunk, 0, split);
          if (split < chunk.length) await meta.put(chunk, split);
          pos += chunk.length;
        }
        if (pos !== size)
          throw new KilnError(
            "INVALID_ARCHIVE",
            `content of /${pathOf(node)} ended after ${pos} of its ${size} bytes`,
          );
      }
    } catch (err) {
      // No write may still be in flight when the file is closed.
      await Promise.all([stream?.settle(), meta.settle()]);
      throw err;
    }
    await Promise.all([stream?.end(), meta.end()]);
    if (index !== files.length && !stopped())
      throw new KilnError("INTERNAL", `content source delivered ${index} of ${files.length} files`);
  });
}

/** A chunk-based file's data regions to its stored chunks; nothing of its holes is written. */
async function writeChunks(
  node: Node,
  plan: ChunkPlan,
  data: AsyncIterable<Buffer>,
  stream: DataStream | undefined,
): Promise<void> {
  const path = () => `/${pathOf(node)}`;
  let rank = 0;
  for await (const { offset, bytes } of regionPieces(node.inode.data!.sparse!, data, path)) {
    const chunk = chunkOf(plan, offset);
    while (rank < plan.stored.length && plan.stored[rank]! < chunk) rank++;
    if (plan.stored[rank] !== chunk || !stream)
      throw new KilnError("INTERNAL", `${path()}: data at offset ${offset} in a chunk without blocks`);
    await stream.seek(chunkPosition(plan, rank, offset));
    await stream.put(bytes);
  }
}

/** Writes `root` as an EROFS image at `out` (created or truncated); returns the image size. */
export async function writeErofs(
  root: Inode,
  content: ContentSource,
  out: string,
  opts: ErofsOptions,
): Promise<{ bytes: number }> {
  if (opts.uuid.length !== 16)
    throw new KilnError("INVALID_ARGUMENT", `EROFS UUID must be 16 bytes, got ${opts.uuid.length}`);
  const volumeName = Buffer.from(opts.volumeName ?? "", "utf8");
  if (volumeName.length > 16)
    throw new KilnError("INVALID_ARGUMENT", `EROFS volume name "${opts.volumeName}" is longer than 16 bytes`);
  const layout = planLayout(root, { buildTime: opts.buildTime, inlineData: opts.inlineData });
  const bytes = layout.totalBlocks * BLOCK_SIZE;
  const fh = await open(out, "w");
  const direct = await openDirect(out);
  try {
    await writeAt(
      fh,
      encodeSuperblockBlock({
        rootNid: nidOf(layout.nodes[0]!),
        inodes: layout.nodes.length,
        buildTime: layout.buildTime,
        buildTimeNsec: layout.buildTimeNsec,
        blocks: layout.totalBlocks,
        metaBlkaddr: layout.metaBlkaddr,
        uuid: opts.uuid,
        volumeName,
        featureIncompat: layout.chunked ? FEATURE_INCOMPAT_CHUNKED_FILE : 0,
      }),
      0,
    );
    await writeMeta(fh, layout);
    await writeDirAndLinkBlocks(fh, layout);
    await writeContents(fh, layout, content, direct);
    await fh.truncate(bytes);
  } finally {
    await direct?.close();
    await fh.close();
  }
  return { bytes };
}
