/**
 * Memory per entry: a layer of 1,000,000 one-line files in 2,000 directories, generated in the run
 * (a small ustar writer, so no million files are created on disk first), made an image with umoci
 * as the tests make theirs, imported (the blobs are copied, not read), then exported to each format
 * while /usr/bin/time records the peak RSS. kiln holds one tree node per entry until the image is
 * written, so this is where that cost shows; the goal is 1,000,000 files in 450 MB.
 */

import { once } from "node:events";
import { createWriteStream, mkdirSync, rmSync } from "node:fs";
import { join } from "node:path";
import { buildImage } from "../test/helpers/images.js";
import { measure } from "./common.js";

export const ENTRIES_GOAL = { files: 1_000_000, rssMB: 450 };
const DIRS = 2_000;
const MTIME = 1_704_067_200;
/** What is handed to the file stream at once. */
const CHUNK = 4 << 20;

export interface EntriesResult {
  files: number;
  dirs: number;
  tarBytes: number;
  /** Seconds to generate the tar and to build the image (umoci compresses it). */
  generateSeconds: number;
  imageSeconds: number;
  importSeconds: number;
  importRssMB: number;
  export: Record<string, { seconds: number; rssMB: number }>;
}

function octal(buf: Buffer, at: number, width: number, value: number): void {
  buf.write(value.toString(8).padStart(width - 1, "0"), at, width - 1, "ascii");
  buf[at + width - 1] = 0;
}

/** One ustar header block for a short `name`. */
function header(name: string, type: "0" | "5", mode: number, size: number): Buffer {
  const h = Buffer.alloc(512);
  h.write(name, 0, 100, "utf8");
  octal(h, 100, 8, mode);
  octal(h, 108, 8, 0);
  octal(h, 116, 8, 0);
  octal(h, 124, 12, size);
  octal(h, 136, 12, MTIME);
  h.fill(0x20, 148, 156); // the checksum counts its own field as spaces
  h.write(type, 156, 1, "ascii");
  h.write("ustar\u000000", 257, 8, "binary");
  let sum = 0;
  for (let i = 0; i < 512; i++) sum += h[i]!;
  h.write(`${sum.toString(8).padStart(6, "0")}\u0000 `, 148, 8, "binary");
  return h;
}

/** Writes the layer: DIRS directories of files/DIRS files, each holding its own number and a newline. */
async function writeTar(file: string, files: number): Promise<number> {
  const out = createWriteStream(file);
  let chunk = Buffer.alloc(CHUNK);
  let fill = 0;
  let total = 0;
  const put = async (b: Buffer) => {
    if (fill + b.length > chunk.length) {
      total += fill;
      if (!out.write(chunk.subarray(0, fill))) await once(out, "drain");
      chunk = Buffer.alloc(CHUNK);
      fill = 0;
    }
    b.copy(chunk, fill);
    fill += b.length;
  };
  const perDir = Math.ceil(files / DIRS);
  let written = 0;
  for (let d = 0; d < DIRS && written < files; d++) {
    const dir = `d${String(d).padStart(4, "0")}/`;
    await put(header(dir, "5", 0o755, 0));
    for (let f = 0; f < perDir && written < files; f++, written++) {
      const body = Buffer.alloc(512);
      const size = body.write(`${written}\n`, "ascii");
      await put(header(`${dir}f${String(f).padStart(4, "0")}`, "0", 0o644, size));
      await put(body);
    }
  }
  await put(Buffer.alloc(1024)); // end of archive
  total += fill;
  out.end(chunk.subarray(0, fill));
  await once(out, "finish");
  return total;
}

/** Generates the layer and image under `dir`, then measures kiln (`kiln` = path of bin/kiln). */
export async function benchEntries(
  dir: string,
  kiln: string,
  formats: readonly string[],
  log: (s: string) => void,
  files = ENTRIES_GOAL.files,
): Promise<EntriesResult> {
  rmSync(dir, { recursive: true, force: true });
  mkdirSync(dir, { recursive: true });
  try {
    log(`entries: generating a layer of ${files} files in ${DIRS} directories`);
    const tar = join(dir, "layer.tar");
    let t0 = process.hrtime.bigint();
    const tarBytes = await writeTar(tar, files);
    const generateSeconds = Number(process.hrtime.bigint() - t0) / 1e9;
    log("entries: building the image (umoci raw add-layer)");
    t0 = process.hrtime.bigint();
    const layout = await buildImage(join(dir, "oci"), { tag: "entries", layers: [{ tarFile: tar }] });
    const imageSeconds = Number(process.hrtime.bigint() - t0) / 1e9;
    rmSync(tar);
    const store = join(dir, "store");
    const ref = "bench/entries:1";
    const imported = measure(kiln, ["--root", store, "--quiet", "import", "--tag", ref, layout.dir]);
    const result: EntriesResult = {
      files,
      dirs: DIRS,
      tarBytes,
      generateSeconds,
      imageSeconds,
      importSeconds: imported.seconds,
      importRssMB: imported.rssMB,
      export: {},
    };
    for (const format of formats) {
      log(`entries: export to ${format}`);
      rmSync(join(store, "artifacts"), { recursive: true, force: true });
      const out = join(dir, `out.${format}`);
      const m = measure(kiln, ["--root", store, "--quiet", "export", ref, "--format", format, "-o", out]);
      result.export[format] = { seconds: m.seconds, rssMB: m.rssMB };
      rmSync(out, { recursive: true, force: true });
    }
    return result;
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}
