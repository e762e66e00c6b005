import { Command } from "commander";
import { KilnError } from "../errors.js";
import { type GcReport, gc } from "../images.js";
import { globals, json, out } from "./common.js";
import { formatBytes, parseDuration } from "./format.js";

/** `kiln gc [--dry-run] [--grace D]`: frees what nothing needs and prints what it freed. */
export function gcCommand(): Command {
  return new Command("gc")
    .description("free blobs no image needs, exports of removed images and stale temp files")
    .option("--dry-run", "print what would be freed; delete nothing")
    .option("--grace <duration>", "leave anything younger than this, e.g. 30m, 2d, 0", "1h")
    .action(async (o: { dryRun?: boolean; grace: string }, cmd: Command) => {
      const g = globals(cmd);
      const graceMs = parseDuration(o.grace);
      if (graceMs === undefined) {
        throw new KilnError(
          "INVALID_ARGUMENT",
          `--grace: "${o.grace}" is not a duration (examples: 30m, 1h, 2d, 90s, 0)`,
        );
      }
      const report = await gc({ root: g.root, graceMs, dryRun: o.dryRun === true });
      if (g.json) return json(report);
      if (g.quiet) return out(String(report.bytes));
      for (const b of report.blobs) out(`blob      ${b.digest}  ${formatBytes(b.size)}`);
      for (const a of report.artifacts) out(`artifact  ${a.path}  ${formatBytes(a.size)}`);
      for (const t of report.temp) out(`temp      ${t.path}  ${formatBytes(t.size)}`);
      out(total(report));
    });
}

/** "Freed 12.3 MB (3 blobs, 1 artifact, 2 temp)", or "Would free …" for a dry run. */
function total(r: GcReport): string {
  const n = (count: number, one: string, many: string) => `${count} ${count === 1 ? one : many}`;
  const parts = [
    n(r.blobs.length, "blob", "blobs"),
    n(r.artifacts.length, "artifact", "artifacts"),
    `${r.temp.length} temp`,
  ];
  return `${r.dryRun ? "Would free" : "Freed"} ${formatBytes(r.bytes)} (${parts.join(", ")})`;
}
