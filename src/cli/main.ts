import { Command, CommanderError, Option } from "commander";
import type { ExportProgress } from "../build/export.js";
import { EXPORT_FORMATS, type ExportFormat } from "../build/formats.js";
import { KilnError, toKilnError } from "../errors.js";
import {
  createDisk,
  describeImage,
  type ExportImageOptions,
  type ExportImageResult,
  exportImage,
  type ImageRecord,
  type IngestResult,
  importArchive,
  inspectImage,
  listImagesAndBuilds,
  pull,
  pullAndExport,
  removeImages,
} from "../images.js";
import { parseReference, refName } from "../reference/reference.js";
import { parsePlatform } from "../registry/platform.js";
import type { BuildRow } from "../store/builds.js";
import { bootCommand, initramfsCommand, vmConfigCommand } from "./boot.js";
import {
  abortOnSignal,
  collect,
  type GlobalOptions,
  globals,
  json,
  out,
  positiveInt,
  progressFor,
  sizeFlag,
} from "./common.js";
import { ago, formatBytes, shortDigest, table } from "./format.js";
import { gcCommand } from "./gc.js";
import { serveCommand } from "./serve.js";
import { isHelpOrVersion, routeUsageErrors, usageError } from "./usage.js";

function summary(r: IngestResult, verb: string): string {
  const img = r.image;
  const name = img.ref ?? "(untagged)";
  return `${verb} ${name} ${img.platform} ${img.manifestDigest} (${img.layers.length} layers: ${r.downloaded} fetched, ${r.present} present; ${formatBytes(img.size)})`;
}

function pullJson(r: IngestResult) {
  return { ...describeImage(r.image), downloaded: r.downloaded, present: r.present };
}

const FORCE_HELP =
  "with -o: replace a directory (or, for erofs-layers, a non-empty directory or a file) at the path";

export function buildProgram(): Command {
  const program = new Command("kiln")
    .description("Turn OCI and Docker container images into root filesystems that microVMs boot")
    .version("0.1.0")
    .option(
      "--root <dir>",
      "store directory (env KILN_ROOT; default $XDG_DATA_HOME/kiln or ~/.local/share/kiln)",
    )
    .option("--json", "machine-readable output")
    .option("-q, --quiet", "print only what was asked for (no progress)")
    .option("-v, --verbose", "more detail (progress lines when stderr is not a terminal)")
    .exitOverride();

  program
    .command("pull")
    .description("pull an image from a registry into the store")
    .argument("<ref>", "image reference, e.g. alpine:3.20 or 127.0.0.1:5000/app@sha256:…")
    .option("--platform <os/arch[/variant]>", "platform to pull from a multi-platform image (default: host)")
    .option("--creds <user:pass>", "registry credentials (default: docker config / credential helpers)")
    .option("--insecure-registry <host[:port]>", "allow plain HTTP to this registry (repeatable)", collect)
    .option("--ca-file <file>", "extra PEM CA certificates to trust")
    .option("--registry-mirror <url>", "mirror for docker.io (repeatable)", collect)
    .addOption(
      new Option("--concurrency <n>", "layers downloaded at once")
        .default(3)
        .argParser(positiveInt("--concurrency")),
    )
    .option("--format <format>", `then export it: ${EXPORT_FORMATS.join(", ")}`)
    .option("-o, --output <path>", "with --format: file to write (default: kept in the store)")
    .option("--size <size>", "ext4: exact size, e.g. 2G")
    .option("--free <size>", "ext4: extra free space for a writable disk")
    .option("--journal", "ext4: add a journal, for a disk mounted read-write")
    .option("--compress <gzip|none>", "cpio: compress the archive", "none")
    .option("--force", FORCE_HELP)
    .action(async (ref: string, o, cmd: Command) => {
      const g = globals(cmd);
      if (o.output !== undefined && !o.format) {
        throw new KilnError("INVALID_ARGUMENT", "-o/--output needs --format");
      }
      // Checked before anything is pulled.
      const flags = o.format ? exportFlags(o) : undefined;
      const progress = await progressFor(g);
      const ac = abortOnSignal();
      const pullOpts = {
        root: g.root,
        platform: o.platform ? parsePlatform(o.platform) : undefined,
        creds: o.creds,
        insecureRegistries: o.insecureRegistry,
        caFile: o.caFile,
        registryMirrors: o.registryMirror,
        concurrency: o.concurrency,
        progress,
        signal: ac.signal,
      };
      if (flags) {
        const exportProgress = await exportProgressFor(g);
        let result: { pulled: IngestResult; exported: ExportImageResult };
        try {
          result = await pullAndExport(ref, o.output, {
            ...pullOpts,
            export: { ...flags, force: o.force === true, progress: exportProgress },
            onPulled: () => progress?.stop?.(),
          });
        } finally {
          progress?.stop?.();
          exportProgress?.stop?.();
        }
        const { pulled, exported } = result;
        if (g.json) json({ ...pullJson(pulled), export: exportJson(exported) });
        else {
          if (!g.quiet) out(summary(pulled, "Pulled"));
          reportExport(g, exported);
        }
        return;
      }
      let result: IngestResult;
      try {
        result = await pull(ref, pullOpts);
      } finally {
        progress?.stop?.();
      }
      if (g.json) json(pullJson(result));
      else if (g.quiet) out(result.image.manifestDigest);
      else out(summary(result, "Pulled"));
    });

  program
    .command("import")
    .description("import a docker-archive tar, an OCI archive tar or an OCI layout directory")
    .argument("<file>", "archive file or OCI layout directory")
    .option("--tag <ref>", "name for the imported image")
    .option(
      "--platform <os/arch[/variant]>",
      "platform to import from a multi-platform archive (default: host)",
    )
    .action(async (file: string, o, cmd: Command) => {
      const g = globals(cmd);
      const progress = await progressFor(g);
      const ac = abortOnSignal();
      let results: IngestResult[];
      try {
        results = await importArchive(file, {
          root: g.root,
          tag: o.tag,
          platform: o.platform ? parsePlatform(o.platform) : undefined,
          progress,
          signal: ac.signal,
        });
      } finally {
        progress?.stop?.();
      }
      if (g.json) json(results.map(pullJson));
      else if (g.quiet) for (const r of results) out(r.image.manifestDigest);
      else for (const r of results) out(summary(r, "Imported"));
    });

  program
    .command("export")
    .description("write an image of the store as a root filesystem")
    .argument("<ref>", "reference, or a unique prefix of the manifest digest")
    .requiredOption("--format <format>", `output format: ${EXPORT_FORMATS.join(", ")}`)
    .option(
      "-o, --output <path>",
      "file to write (replaced atomically; a symlink's target; a block device in place); default: kept in the store",
    )
    .option("--size <size>", "ext4: exact size, e.g. 2G (default: content + metadata + headroom)")
    .option("--free <size>", "ext4: extra free space (and inodes) for a writable disk, e.g. 1G")
    .option("--journal", "ext4: add a journal (sized as mke2fs would), for a disk mounted read-write")
    .option("--compress <gzip|none>", "cpio: compress the archive", "none")
    .option("--platform <os/arch[/variant]>", "which platform, when the store holds several for the ref")
    .option("--force", FORCE_HELP)
    .action(async (ref: string, o, cmd: Command) => {
      const g = globals(cmd);
      const r = await exportWithProgress(g, ref, o.output, {
        root: g.root,
        ...exportFlags(o),
        force: o.force === true,
        platform: o.platform ? parsePlatform(o.platform) : undefined,
      });
      reportExport(g, r);
    });

  program
    .command("disk")
    .description("empty disks")
    .command("create")
    .description("create an empty, sparse ext4 filesystem (a volume, an overlay upper)")
    .argument("<path>", "file to write")
    .requiredOption("--size <size>", "size, e.g. 10G")
    .option("--label <label>", "volume label (at most 16 bytes)")
    .option("--force", "replace an existing non-empty file (its data is lost)")
    .action(async (path: string, o, cmd: Command) => {
      const g = globals(cmd);
      const r = await createDisk(path, sizeFlag("--size", o.size)!, {
        label: o.label,
        force: o.force === true,
      });
      if (g.json) json({ output: r.out, bytes: r.bytes });
      else if (g.quiet) out(r.out);
      else out(`Created ${r.out} (ext4, ${formatBytes(r.bytes)}, sparse)`);
    });

  program
    .command("images")
    .alias("ls")
    .description("list the images in the store")
    .action(async (_o, cmd: Command) => {
      const g = globals(cmd);
      const { images, builds } = await listImagesAndBuilds({ root: g.root });
      const rows = imageRows(images, builds);
      if (g.json) return json(rows);
      if (g.quiet) {
        for (const r of rows) if (r.digest) out(r.digest);
        return;
      }
      const now = Date.now();
      const withStatus = builds.length > 0;
      out(
        table(
          ["REPOSITORY", "TAG", "PLATFORM", "DIGEST", "CREATED", "SIZE", ...(withStatus ? ["BUILDS"] : [])],
          rows.map((r) => [
            r.repository ?? "<none>",
            r.tag ?? "<none>",
            r.platform,
            r.digest ? shortDigest(r.digest) : "-",
            ago(r.created, now),
            r.size === null ? "-" : formatBytes(r.size),
            ...(withStatus ? [r.builds.map((b) => `${b.format}:${b.status}`).join(" ")] : []),
          ]),
        ),
      );
    });

  program
    .command("inspect")
    .description("show an image's digests, layers and runtime config as JSON")
    .argument("<ref>", "reference, or a unique prefix of the manifest digest")
    .option("--platform <os/arch[/variant]>", "which platform, when the store holds several for the ref")
    .action(async (ref: string, o, cmd: Command) => {
      const g = globals(cmd);
      json(
        await inspectImage(ref, {
          root: g.root,
          platform: o.platform ? parsePlatform(o.platform) : undefined,
        }),
      );
    });

  program
    .command("rm")
    .alias("rmi")
    .description("remove images from the store (and blobs no other image uses)")
    .argument("<ref...>", "references or digest prefixes")
    .option("--platform <os/arch[/variant]>", "which platform, when the store holds several for the ref")
    .action(async (refs: string[], o, cmd: Command) => {
      const g = globals(cmd);
      const r = await removeImages(refs, {
        root: g.root,
        platform: o.platform ? parsePlatform(o.platform) : undefined,
      });
      if (g.json) {
        json({
          removed: r.removed.map(imageRow),
          failed: r.failed.map((f) => ({ arg: f.arg, code: f.error.code, message: f.error.message })),
        });
      } else {
        for (const img of r.removed)
          out(`Deleted: ${img.ref ?? "(untagged)"} ${img.platform} ${img.manifestDigest}`);
        for (const f of r.failed) process.stderr.write(`kiln: error [${f.error.code}]: ${f.error.message}\n`);
      }
      if (r.failed.length > 0) process.exitCode = 1;
    });

  program.addCommand(gcCommand());
  program.addCommand(serveCommand());
  program.addCommand(initramfsCommand());
  program.addCommand(vmConfigCommand());
  program.addCommand(bootCommand());
  routeUsageErrors(program);

  return program;
}

function parseFormat(v: string): ExportFormat {
  if (!(EXPORT_FORMATS as readonly string[]).includes(v)) {
    throw new KilnError(
      "INVALID_ARGUMENT",
      `--format: unknown format "${v}"; expected ${EXPORT_FORMATS.join(", ")}`,
    );
  }
  return v as ExportFormat;
}

/** The export flags shared by `export` and `pull --format`, checked against the format. */
function exportFlags(o: {
  format: string;
  size?: string;
  free?: string;
  journal?: boolean;
  compress?: string;
}) {
  const format = parseFormat(o.format);
  if (format !== "ext4" && (o.size !== undefined || o.free !== undefined || o.journal)) {
    throw new KilnError("INVALID_ARGUMENT", "--size, --free and --journal apply to --format ext4");
  }
  if (format !== "cpio" && o.compress !== undefined && o.compress !== "none") {
    throw new KilnError("INVALID_ARGUMENT", "--compress applies to --format cpio");
  }
  return {
    format,
    compress: parseCompress(o.compress),
    size: sizeFlag("--size", o.size),
    free: sizeFlag("--free", o.free),
    journal: o.journal === true,
  };
}

/**
 * exportImage with progress on a TTY (bars) or with --verbose (lines); nothing with --json or
 * --quiet. The progress module loads only when it will draw something.
 */
async function exportWithProgress(
  g: GlobalOptions,
  ref: string,
  output: string | undefined,
  opts: ExportImageOptions,
): Promise<ExportImageResult> {
  const progress = await exportProgressFor(g);
  try {
    return await exportImage(ref, output, { ...opts, progress });
  } finally {
    progress?.stop?.();
  }
}

/** Export progress: bars on a TTY, lines with --verbose, nothing with --json or --quiet. */
async function exportProgressFor(
  g: GlobalOptions,
): Promise<(ExportProgress & { stop?(): void }) | undefined> {
  if (g.json || g.quiet || !(process.stderr.isTTY || g.verbose)) return undefined;
  const { lineExportProgress, ttyExportProgress } = await import("./progress.js");
  return process.stderr.isTTY ? ttyExportProgress(process.stderr) : lineExportProgress(process.stderr);
}

function parseCompress(v: string | undefined): "gzip" | "none" {
  if (v === undefined || v === "none") return "none";
  if (v === "gzip") return "gzip";
  throw new KilnError("INVALID_ARGUMENT", `--compress: unknown compression "${v}"; expected gzip or none`);
}

function exportJson(r: ExportImageResult) {
  return {
    ref: r.image.ref,
    digest: r.image.manifestDigest,
    format: r.format,
    output: r.out,
    bytes: r.bytes,
    cached: r.cached,
    warnings: r.warnings,
  };
}

function reportExport(g: GlobalOptions, r: ExportImageResult): void {
  // --json carries them; --quiet prints only what was asked for.
  if (!g.json && !g.quiet) for (const w of r.warnings) process.stderr.write(`kiln: warning: ${w}\n`);
  if (g.json) json(exportJson(r));
  else if (g.quiet) out(r.out);
  else
    out(
      `Exported ${r.image.ref ?? r.image.manifestDigest} as ${r.format} to ${r.out} (${formatBytes(r.bytes)}${r.cached ? ", from cache" : ""})`,
    );
}

/**
 * `kiln images` rows: every image of the store with the service builds of it, then the builds whose
 * image is not in the store (yet: pending, pulling; or failed).
 */
function imageRows(images: ImageRecord[], builds: BuildRow[]) {
  const buildJson = (b: BuildRow) => ({
    format: b.format,
    status: b.status,
    ...(b.errorCode ? { error: { code: b.errorCode, message: b.errorMessage ?? "" } } : {}),
  });
  const used = new Set<number>();
  const rows = images.map((i) => {
    const mine = builds.filter((b) => b.name === i.ref && b.platform === i.platform);
    for (const b of mine) used.add(b.id);
    return { ...imageRow(i), builds: mine.map(buildJson) };
  });
  const rest = new Map<string, BuildRow[]>();
  for (const b of builds) {
    if (used.has(b.id)) continue;
    const key = `${b.name}\n${b.platform}`;
    rest.set(key, [...(rest.get(key) ?? []), b]);
  }
  for (const group of rest.values()) {
    const b = group[0]!;
    const ref = parseReference(b.name);
    rows.push({
      ref: b.name,
      repository: refName(ref),
      tag: ref.tag ?? null,
      digest: b.manifestDigest,
      indexDigest: null,
      platform: b.platform,
      size: null,
      created: null,
      layers: null,
      builds: group.map(buildJson),
    });
  }
  return rows;
}

function imageRow(i: ImageRecord) {
  return {
    ref: i.ref,
    repository: i.repository,
    tag: i.tag,
    digest: i.manifestDigest as string | null,
    indexDigest: i.indexDigest,
    platform: i.platform,
    size: i.size as number | null,
    created: i.created,
    layers: i.layers.length as number | null,
  };
}

/** Runs the CLI; prints one line with the error code on failure and sets a non-zero exit code. */
export async function main(argv: string[]): Promise<number> {
  const program = buildProgram();
  const wantsJson = argv.includes("--json");
  try {
    await program.parseAsync(argv, { from: "user" });
    return typeof process.exitCode === "number" ? process.exitCode : 0;
  } catch (err) {
    if (err instanceof CommanderError && isHelpOrVersion(err)) return err.exitCode === 0 ? 0 : 2;
    const e = err instanceof CommanderError ? usageError(err) : toKilnError(err);
    if (wantsJson)
      process.stderr.write(
        `${JSON.stringify({ error: { code: e.code, message: e.message, ...(e.details ? { details: e.details } : {}) } })}\n`,
      );
    else process.stderr.write(`kiln: error [${e.code}]: ${e.message.split("\n")[0]}\n`);
    if (argv.includes("--verbose") && e.code === "INTERNAL" && e.stack) process.stderr.write(`${e.stack}\n`);
    // A usage error (2) is the caller's to fix; anything else (1) failed while working.
    return e.code === "INVALID_ARGUMENT" ? 2 : 1;
  }
}
