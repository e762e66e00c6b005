/**
 * The sparse bomb (issue 23): one layer of a few KiB holding GNU sparse files of 1 TiB and 8 TiB
 * with 4 KiB of data each. `kiln export` to each format must take under a second (process start
 * included) and keep the image small: the work follows the data, not the apparent size. cpio is
 * left out: newc cannot hold these files, and the export refuses them before reading any data.
 *
 *   node --import tsx bench/sparse.ts          (BENCH_RUNS runs each, default 3; median shown)
 */
import { mkdirSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { MB, measure, median, REPO_ROOT, secs, sh, sizes, table } from "./common.js";

const RUNS = Number(process.env.BENCH_RUNS ?? 3);
const TARGET_SECONDS = 1;
const KILN = "bin/kiln";
const FORMATS = ["ext4", "erofs", "erofs-layers"] as const;
const TiB = 2 ** 40;

const work = join(REPO_ROOT, "bench", ".cache", "sparse");
rmSync(work, { recursive: true, force: true });
const root = join(work, "root");
mkdirSync(root, { recursive: true });
const piece = join(work, "piece");
writeFileSync(piece, Buffer.alloc(4096, 0x5a));
for (const [name, size] of [
  ["bomb-1t", TiB],
  ["bomb-8t", 8 * TiB],
] as const) {
  const file = join(root, name);
  sh("truncate", ["-s", String(size), file]);
  sh("dd", [
    `if=${piece}`,
    `of=${file}`,
    "oflag=seek_bytes",
    `seek=${size / 2}`,
    "conv=notrunc",
    "status=none",
  ]);
}
const tar = join(work, "layer.tar");
sh("tar", ["-c", "-f", tar, "--sparse", "--format=posix", "-C", root, "bomb-1t", "bomb-8t"]);
const layout = join(work, "oci");
sh("umoci", ["init", "--layout", layout]);
sh("umoci", ["new", "--image", `${layout}:bomb`]);
sh("umoci", ["raw", "add-layer", "--image", `${layout}:bomb`, tar]);
const store = join(work, "store");
const env = { KILN_ROOT: store };
sh(KILN, ["import", layout, "--tag", "bench/sparse-bomb:1"], { env });

const rows = [["format", "export", "peak RSS", "image (apparent / allocated)", `under ${TARGET_SECONDS} s`]];
for (const format of FORMATS) {
  const runs = [];
  let out = "";
  for (let i = 0; i < RUNS; i++) {
    out = join(work, `out-${i}.${format}`);
    runs.push(measure(KILN, ["export", "bench/sparse-bomb:1", "--format", format, "-o", out], { env }));
  }
  const image = format === "erofs-layers" ? join(out, "layer-000.erofs") : out;
  const { apparent, allocated } = sizes(image);
  const seconds = median(runs.map((r) => r.seconds));
  rows.push([
    format,
    secs(seconds),
    `${median(runs.map((r) => r.rssMB)).toFixed(0)} MB`,
    `${(apparent / MB).toFixed(2)} / ${(allocated / MB).toFixed(2)} MB`,
    seconds < TARGET_SECONDS ? "yes" : "NO",
  ]);
}
console.log(`sparse bomb: ${(sizes(tar).apparent / 1024).toFixed(0)} KiB layer, 1 TiB + 8 TiB sparse files`);
console.log(table(rows));
rmSync(work, { recursive: true, force: true });
