/** `kiln serve`: the image manager and its HTTP API (with the embedded registry) over the store. */
import { Command, Option } from "commander";
import { EXPORT_FORMATS, type ExportFormat } from "../build/formats.js";
import { KilnError } from "../errors.js";
import { collect, globals, positiveInt } from "./common.js";
import { parseDuration } from "./format.js";

export function serveCommand(): Command {
  return new Command("serve")
    .description("run the image service: build queue, HTTP API and embedded registry over the store")
    .option("--listen <host:port>", "address to listen on (port 0: any free port)", "127.0.0.1:7070")
    .option(
      "--token <token>",
      "require Authorization: Bearer <token> on every request but /healthz (env KILN_TOKEN)",
    )
    .addOption(
      new Option("--concurrency <n>", "builds at once (default: one per two cores)").argParser(
        positiveInt("--concurrency"),
      ),
    )
    .option(
      "--default-format <format>",
      `format of requests that name none: ${EXPORT_FORMATS.join(", ")}`,
      "ext4",
    )
    .option("--convert-on-push", "convert images pushed into the embedded registry to the default format")
    .addOption(
      new Option(
        "--pull-policy <policy>",
        "missing: use the stored image if present; always: resolve tags again",
      )
        .choices(["missing", "always"])
        .default("missing"),
    )
    .option("--gc-interval <duration>", "run GC this often, e.g. 1h (default: never)")
    .option("--grace <duration>", "GC leaves unreferenced things younger than this", "1h")
    .option("--shutdown-timeout <duration>", "on SIGTERM, wait this long for running builds", "30s")
    .option("--log-level <level>", "fatal, error, warn, info, debug, trace or silent", "info")
    .option("--creds <user:pass>", "registry credentials for pulls (default: docker config)")
    .option("--insecure-registry <host[:port]>", "allow plain HTTP to this registry (repeatable)", collect)
    .option("--ca-file <file>", "extra PEM CA certificates to trust")
    .option("--registry-mirror <url>", "mirror for docker.io (repeatable)", collect)
    .action(async (o, cmd: Command) => {
      const g = globals(cmd);
      const { host, port } = parseListen(o.listen);
      const defaultFormat = o.defaultFormat as ExportFormat;
      if (!(EXPORT_FORMATS as readonly string[]).includes(defaultFormat)) {
        throw new KilnError("INVALID_ARGUMENT", `--default-format: unknown format "${defaultFormat}"`);
      }
      const gcInterval = o.gcInterval === undefined ? undefined : duration("--gc-interval", o.gcInterval);
      const grace = duration("--grace", o.grace);
      const shutdownTimeout = duration("--shutdown-timeout", o.shutdownTimeout);
      const token: string | undefined = o.token ?? (process.env.KILN_TOKEN || undefined);

      const [{ ImageManager }, { buildServer }] = await Promise.all([
        import("../build/manager.js"),
        import("../server/app.js"),
      ]);
      const manager = await ImageManager.open({
        root: g.root,
        concurrency: o.concurrency,
        defaultFormat,
        convertOnPush: o.convertOnPush === true,
        pullPolicy: o.pullPolicy,
        creds: o.creds,
        insecureRegistries: o.insecureRegistry,
        caFile: o.caFile,
        registryMirrors: o.registryMirror,
      });
      const app = await buildServer({ manager, token, logger: { level: o.logLevel } });
      let gcTimer: NodeJS.Timeout | undefined;
      try {
        const recovered = manager.start();
        if (recovered.length > 0)
          app.log.info({ builds: recovered.map((b) => b.id) }, "re-queued interrupted builds");
        await app.listen({ host, port });
      } catch (err) {
        await manager.shutdown(0);
        throw err;
      }
      const address = app.server.address();
      const url = typeof address === "object" && address ? `http://${host}:${address.port}` : String(address);
      process.stderr.write(`kiln serve: listening on ${url} (store ${g.root})\n`);

      if (gcInterval !== undefined && gcInterval > 0) {
        const { collectGarbage } = await import("../store/gc.js");
        gcTimer = setInterval(() => {
          collectGarbage(manager.store, { graceMs: grace })
            .then((r) => app.log.info({ bytes: r.bytes }, "gc"))
            .catch((err) => app.log.error({ err }, "gc failed"));
        }, gcInterval);
        gcTimer.unref();
      }

      await new Promise<void>((resolve) => {
        const stop = (sig: NodeJS.Signals) => {
          app.log.info({ signal: sig }, "shutting down");
          resolve();
        };
        process.once("SIGTERM", stop);
        process.once("SIGINT", stop);
      });
      if (gcTimer) clearInterval(gcTimer);
      // Stop taking requests (in-flight ones finish), then builds; the catalog closes last.
      await app.close();
      await manager.shutdown(shutdownTimeout);
    });
}

function parseListen(v: string): { host: string; port: number } {
  const m = /^(?:\[([^\]]+)\]|([^:]*)):(\d+)$/.exec(v);
  const port = m ? Number(m[3]) : Number.NaN;
  if (!m || port > 65535) {
    throw new KilnError("INVALID_ARGUMENT", `--listen: "${v}" is not host:port (e.g. 127.0.0.1:7070)`);
  }
  return { host: m[1] ?? (m[2] || "0.0.0.0"), port };
}

function duration(flag: string, v: string): number {
  const ms = parseDuration(v);
  if (ms === undefined)
    throw new KilnError("INVALID_ARGUMENT", `${flag}: "${v}" is not a duration (e.g. 30s, 1h)`);
  return ms;
}
