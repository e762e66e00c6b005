/**
 * Pull-driven zstd decompression: output is written into fixed-size buffers, and the next one is
 * filled only when the consumer asks for it. zstd-napi's DecompressStream emits everything one input
 * chunk expands to before it looks at backpressure, so a small bomb became gigabytes in memory.
 */
import binding from "zstd-napi/binding.js";

/**
 * Yields the decompressed bytes of `input` (one or more zstd frames, skippable frames included) in
 * chunks of exactly `chunkSize` bytes, the last one shorter. Each chunk is a new buffer the
 * consumer owns. Input is pulled only when the previous piece is used up. Corrupt data throws
 * zstd's error; input that ends inside a frame throws a truncation error.
 */
export async function* decompressZstd(
  input: AsyncIterable<Buffer>,
  chunkSize: number,
): AsyncGenerator<Buffer> {
  const dctx = new binding.DCtx();
  let out = Buffer.allocUnsafe(chunkSize);
  let filled = 0;
  // zstd's hint of what the current frame still needs: 0 once a frame is decoded and flushed.
  let needed = 0;
  for await (const piece of input) {
    let src = piece;
    for (;;) {
      const [hint, produced, consumed] = dctx.decompressStream(out.subarray(filled), src);
      needed = hint;
      filled += produced;
      src = src.subarray(consumed);
      if (filled === out.length) {
        // Full: the consumer takes it before anything more is decoded.
        yield out;
        out = Buffer.allocUnsafe(chunkSize);
        filled = 0;
        // A finished frame holds nothing more; asked again, zstd would await the next frame's header.
        if (src.length === 0 && needed === 0) break;
      } else if (src.length === 0) {
        // Room left in the output and the input used up: everything decodable was flushed.
        break;
      }
    }
  }
  if (needed !== 0) throw new Error("the data ends in the middle of a frame");
  if (filled > 0) yield out.subarray(0, filled);
}
