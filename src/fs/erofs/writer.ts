/**
 * Writes a tree as an uncompressed EROFS image (4 KiB blocks). The layout is computed first
 * (layout.ts); then the superblock, the metadata area and directory/symlink blocks are written,
 * and finally file contents stream in dataOrder, each file's full blocks to its data blocks and
 * its tail into the slot reserved after its inode. All-zero blocks are skipped: the output is
 * sparse. Nothing depends on the clock: UUID and times come from the caller and the tree.
 */
import { writeSync } from "node:fs";
import { type FileHandle, open } from "node:fs/promises";
import { KilnError } from "../../errors.js";
import { DataStream, isZeroRange } from "../datastream.js";
import type { ContentSource, Inode } from "../tree.js";
import { encodeDirBlock } from "./dirent.js";
import { encodeInode, modeBits } from "./inode.js";
import { inodeSize, type Layout, type Node, nidOf, planLayout } from "./layout.js";
import { BLOCK_SIZE, encodeSuperblockBlock } from "./superblock.js";
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

const CHUNK = 1 << 20;
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

/** One slot: the inode, its xattrs, and its inline tail when it is a directory's or symlink's. */
function encodeSlot(node: Node): Buffer {
  const isize = inodeSize(node);
  const buf = Buffer.alloc(isize + node.xattrs.length + node.tail);
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

/** The metadata area, written in order through a 1 MiB buffer. */
async function writeMeta(fh: FileHandle, layout: Layout): Promise<void> {
  const base = layout.metaBlkaddr * BLOCK_SIZE;
  const chunk = Buffer.alloc(CHUNK);
  let chunkStart = 0;
  const flush = async (upTo: number): Promise<void> => {
    await writeAt(fh, chunk.subarray(0, upTo), base + chunkStart);
    chunk.fill(0);
  };
  for (const node of layout.nodes) {
    const slot = encodeSlot(node);
    let at = node.offset;
    let from = 0;
    while (from < slot.length) {
      if (at - chunkStart >= CHUNK) {
        await flush(CHUNK);
        chunkStart += CHUNK;
        continue;
      }
      const n = Math.min(slot.length - from, CHUNK - (at - chunkStart));
      slot.copy(chunk, at - chunkStart, from, from + n);
      from += n;
      at += n;
    }
  }
  await flush(layout.metaBytes - chunkStart);
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

/** Streams file contents: full blocks to the data area, the tail into the inode's slot. */
async function writeContents(fh: FileHandle, layout: Layout, content: ContentSource): Promise<void> {
  const stream = new DataStream(fh, BLOCK_SIZE);
  let index = 0;
  // Transient: every chunk is copied (into the data stream or the tail) before the next is asked for.
  for await (const { inode, data } of content.contents(layout.files, { transient: true })) {
    const node = layout.byInode.get(inode);
    if (inode !== layout.files[index] || !node)
      throw new KilnError("INTERNAL", "content source delivered files out of dataOrder");
    index++;
    const size = node.size;
    const inBlocks = node.tail > 0 ? node.blocks * BLOCK_SIZE : size;
    const tail = node.tail > 0 ? Buffer.alloc(node.tail) : undefined;
    if (inBlocks > 0) await stream.seek(node.u * BLOCK_SIZE);
    let pos = 0;
    for await (const chunk of data) {
      if (pos + chunk.length > size)
        throw new KilnError("INVALID_ARCHIVE", `content of /${node.path} is longer than its ${size} bytes`);
      const split = Math.max(0, Math.min(chunk.length, inBlocks - pos));
      if (split > 0) await stream.put(chunk, 0, split);
      if (split < chunk.length) chunk.copy(tail!, pos + split - inBlocks, split);
      pos += chunk.length;
    }
    if (pos !== size)
      throw new KilnError(
        "INVALID_ARCHIVE",
        `content of /${node.path} ended after ${pos} of its ${size} bytes`,
      );
    if (tail && !isZeroRange(tail, 0, tail.length)) {
      const at = layout.metaBlkaddr * BLOCK_SIZE + node.offset + inodeSize(node) + node.xattrs.length;
      await writeAt(fh, tail, at);
    }
  }
  await stream.end();
  if (index !== layout.files.length)
    throw new KilnError("INTERNAL", `content source delivered ${index} of ${layout.files.length} files`);
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
      }),
      0,
    );
    await writeMeta(fh, layout);
    await writeDirAndLinkBlocks(fh, layout);
    await writeContents(fh, layout, content);
    await fh.truncate(bytes);
  } finally {
    await fh.close();
  }
  return { bytes };
}
