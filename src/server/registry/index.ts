/**
 * The embedded registry of `kiln serve`: the OCI distribution API under /v2/ over the kiln store.
 * Pushed images land in the catalog like pulled ones (exportable, listed by `kiln images`), and
 * what the store holds can be pulled back, so kiln also serves as a registry mirror.
 *
 * Deleting manifests or blobs through this API is not supported (405): images are removed through
 * the kiln API (`kiln rm`), which knows what else uses their blobs.
 *
 * A fastify plugin, encapsulated: its content-type parser hands request bodies through unread so
 * uploads stream to disk. Authentication is the host app's (an onRequest hook at its root).
 */
import type { FastifyBaseLogger, FastifyPluginAsync, FastifyReply, FastifyRequest } from "fastify";
import type { ImageRecord } from "../../store/catalog.js";
import type { Store } from "../../store/store.js";
import { getBlob, startUpload, unsupported, upload } from "./blobs.js";
import type { RegistryContext } from "./context.js";
import { RegistryError, toRegistryError } from "./errors.js";
import { listRepositories, listTags } from "./listing.js";
import { getManifest, putManifest } from "./manifests.js";
import { parseRepoName } from "./names.js";
import { Uploads } from "./uploads.js";

export { RegistryError, toRegistryError } from "./errors.js";
export { MAX_MANIFEST_BYTES } from "./manifests.js";

export interface RegistryPluginOptions {
  store: Store;
  /** Called with the records of each image pushed by tag (every platform of an index), after they are recorded. */
  onPushed?: ((images: ImageRecord[]) => void | Promise<void>) | undefined;
  log?: FastifyBaseLogger | undefined;
}

const METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"];

export const registryPlugin: FastifyPluginAsync<RegistryPluginOptions> = async (app, opts) => {
  const ctx: RegistryContext = {
    store: opts.store,
    log: opts.log ?? app.log,
    uploads: new Uploads(opts.store),
    onPushed: opts.onPushed,
    pushed: new Map(),
    tagLocks: new Map(),
  };
  const swept = await ctx.uploads.sweep();
  if (swept > 0) ctx.log.info({ uploads: swept }, "registry: removed abandoned uploads");

  // Bodies are streams the handlers read themselves: blobs go to disk, never whole into memory.
  app.removeAllContentTypeParsers();
  app.addContentTypeParser("*", (_req, payload, done) => done(null, payload));

  app.addHook("onSend", async (_req, reply, payload) => {
    reply.header("docker-distribution-api-version", "registry/2.0");
    return payload;
  });

  app.setErrorHandler((err, req, reply) => {
    const e = toRegistryError(err);
    if (e.status >= 500) ctx.log.error({ err, method: req.method, url: req.url }, "registry: request failed");
    reply.code(e.status).headers(e.headers).send(e.body());
  });

  const handler = (req: FastifyRequest, reply: FastifyReply) => route(ctx, req, reply);
  app.route({ method: METHODS, url: "/v2", exposeHeadRoute: false, handler });
  app.route({ method: METHODS, url: "/v2/*", exposeHeadRoute: false, handler });
};

async function route(ctx: RegistryContext, req: FastifyRequest, reply: FastifyReply): Promise<FastifyReply> {
  const raw = req.url.split("?")[0]!;
  let path: string;
  try {
    path = decodeURIComponent(raw);
  } catch {
    throw new RegistryError("NAME_INVALID", `malformed request path ${raw}`);
  }
  const rest = path === "/v2" ? "" : path.slice("/v2/".length);
  const method = req.method;
  const read = method === "GET" || method === "HEAD";

  if (rest === "") {
    if (!read) throw unsupported(method, "/v2/");
    return reply.code(200).send({});
  }
  if (rest === "_catalog") {
    if (!read) throw unsupported(method, "the catalog");
    return listRepositories(ctx, req, reply);
  }
  let m = /^(.+)\/tags\/list$/.exec(rest);
  if (m) {
    if (!read) throw unsupported(method, "a tag list");
    return listTags(ctx, parseRepoName(m[1]!), req, reply);
  }
  m = /^(.+)\/manifests\/([^/]+)$/.exec(rest);
  if (m) {
    const repo = parseRepoName(m[1]!);
    if (read) return getManifest(ctx, repo, m[2]!, req, reply);
    if (method === "PUT") return putManifest(ctx, repo, m[2]!, req, reply);
    if (method === "DELETE") {
      throw new RegistryError(
        "UNSUPPORTED",
        "deleting manifests through the registry API is not supported: remove images with the kiln API (kiln rm)",
      );
    }
    throw unsupported(method, "a manifest");
  }
  m = /^(.+)\/blobs\/uploads\/?$/.exec(rest);
  if (m) {
    if (method !== "POST") throw unsupported(method, "the uploads endpoint");
    return startUpload(ctx, parseRepoName(m[1]!), req, reply);
  }
  m = /^(.+)\/blobs\/uploads\/([^/]+)$/.exec(rest);
  if (m) return upload(ctx, parseRepoName(m[1]!), m[2]!, req, reply);
  m = /^(.+)\/blobs\/([^/]+)$/.exec(rest);
  if (m) {
    const repo = parseRepoName(m[1]!);
    if (read) return getBlob(ctx, repo, m[2]!, req, reply);
    if (method === "DELETE") {
      throw new RegistryError(
        "UNSUPPORTED",
        "deleting blobs through the registry API is not supported: the store's GC removes unused blobs",
      );
    }
    throw unsupported(method, "a blob");
  }
  throw new RegistryError("NOT_FOUND", `no such registry endpoint: ${method} ${raw}`, { status: 404 });
}
