/**
 * Small chunks joined into pieces of at least `min` bytes. Network reads arrive 16–64 KiB at a
 * time, and every chunk costs each stage after it a call of its own: a thread-pool round trip to
 * the decompressor (and an output chunk per input chunk), a write, a hash update. On these
 * machines issuing an async write or inflate costs 25–150 µs of the main thread, far more than
 * copying the bytes; a chunk already as large as `min` passes through uncopied.
 */
/** Half a MiB: decompressed, about one zlib output chunk (1 MiB) of typical layer data. */
export const PIECE = 512 << 10;

export async function* pieces(src: AsyncIterable<Uint8Array>, min = PIECE): AsyncGenerator<Buffer> {
  let held: Buffer[] = [];
  let length = 0;
  for await (const chunk of src) {
    const buf = Buffer.isBuffer(chunk)
      ? chunk
      : Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength);
    if (length === 0 && buf.length >= min) {
      yield buf;
      continue;
    }
    held.push(buf);
    length += buf.length;
    if (length >= min) {
      yield Buffer.concat(held, length);
      held = [];
      length = 0;
    }
  }
  if (length > 0) yield held.length === 1 ? held[0]! : Buffer.concat(held, length);
}
