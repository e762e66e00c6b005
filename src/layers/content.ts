/**
 * File bytes for the writers, read back from the layers: files come in dataOrder (layer, then
 * offset), so each needed layer is decompressed once, front to back, skipping what lies between
 * files. A layer stream is read to its end, so its diff ID is checked again in this pass; a layer
 * given as a ByteSource over a file skips what lies between files without reading it.
 */
import { KilnError } from "../errors.js";
import type { ContentOptions, ContentSource, Inode } from "../fs/tree.js";
import { ByteReader, type ByteSource, isByteSource } from "../tar/reader.js";

/**
 * Opens layer `index`'s uncompressed tar: a stream (e.g. openLayerStream over its blob), or a
 * ByteSource (e.g. a FileByteSource over an uncompressed blob). `transient`: the consumer copies
 * each chunk before asking for the next (ContentOptions), so the source may reuse its buffers.
 */
export type OpenLayer = (index: number, transient: boolean) => Promise<AsyncIterable<Buffer> | ByteSource>;

export class LayerContent implements ContentSource {
  constructor(private readonly openLayer: OpenLayer) {}

  async *contents(
    files: readonly Inode[],
    opts: ContentOptions = {},
  ): AsyncIterable<{ inode: Inode; data: AsyncIterable<Buffer> }> {
    let layer = -1;
    let reader: ByteSource | undefined;
    const truncated = (what: string) =>
      new KilnError("INVALID_ARCHIVE", `layer ${layer}: stream ends before ${what}`);
    try {
      for (const inode of files) {
        const ref = inode.data;
        if (ref === undefined) {
          if (inode.size !== 0)
            throw new KilnError("INTERNAL", `a ${inode.size}-byte file has no data reference`);
          yield { inode, data: empty() };
          continue;
        }
        if (ref.layer !== layer) {
          if (ref.layer < layer) throw outOfOrder(ref.layer, ref.offset);
          if (reader) await reader.drain();
          await reader?.close();
          layer = ref.layer;
          const input = await this.openLayer(layer, opts.transient === true);
          reader = isByteSource(input) ? input : new ByteReader(input, truncated);
        }
        const r = reader!;
        if (ref.offset < r.position) throw outOfOrder(ref.layer, ref.offset);
        const what = `the data at offset ${ref.offset}`;
        await r.skip(ref.offset - r.position, what);
        const stored = r.take(ref.stored, `the end of the data at offset ${ref.offset}`);
        // A sparse file's stored bytes are its data regions back to back (merge checked the map).
        if (!ref.sparse && ref.stored !== inode.size) {
          throw new KilnError(
            "INTERNAL",
            `layer ${layer} offset ${ref.offset}: ${ref.stored} bytes stored for a ${inode.size}-byte file`,
          );
        }
        yield { inode, data: stored };
      }
      // Read each layer to its end: that is where its diff ID is checked.
      if (reader) await reader.drain();
    } finally {
      await reader?.close();
    }
  }
}

function outOfOrder(layer: number, offset: number): KilnError {
  return new KilnError("INTERNAL", `file data at layer ${layer} offset ${offset} is not in dataOrder`);
}

async function* empty(): AsyncGenerator<Buffer> {}
