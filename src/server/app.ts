/**
 * The HTTP service: the image API, health, metrics, the OpenAPI document and the embedded registry
 * under /v2/, with one bearer token guarding everything but /healthz.
 */
import { timingSafeEqual } from "node:crypto";
import Fastify, { type FastifyInstance, type FastifyServerOptions } from "fastify";
import type { ImageManager } from "../build/manager.js";
import { KilnError, toKilnError } from "../errors.js";
import type { ImageRecord } from "../store/catalog.js";
import { registerApi } from "./api.js";
import { httpStatus } from "./errors.js";
import { serviceMetrics } from "./metrics.js";
import { openApiDocument } from "./openapi.js";
import { SHARED_SCHEMAS } from "./schemas.js";

export interface ServerOptions {
  manager: ImageManager;
  /** Every request but GET /healthz needs `Authorization: Bearer <token>` (or Basic with it as password). */
  token?: string | undefined;
  /** Fastify/pino logger options; false for none. */
  logger?: FastifyServerOptions["logger"];
  version?: string;
}

declare module "fastify" {
  interface FastifyContextConfig {
    public?: boolean;
  }
}

export async function buildServer(opts: ServerOptions): Promise<FastifyInstance> {
  const { manager } = opts;
  const app = Fastify({
    logger: opts.logger ?? false,
    // Image references carry ':' and '/' (URL-encoded as %2F): keep them whole in one parameter.
    routerOptions: { maxParamLength: 1024 },
    ajv: { customOptions: { removeAdditional: false, coerceTypes: false } },
  });
  for (const s of SHARED_SCHEMAS) app.addSchema(s);

  if (opts.token) app.addHook("onRequest", bearerAuth(opts.token));

  app.setErrorHandler((err: Error & { validation?: unknown; statusCode?: number }, req, reply) => {
    const e = apiError(err);
    const status = httpStatus(e.code);
    if (status >= 500) req.log.error({ err }, "request failed");
    reply.code(status).send({ code: e.code, message: e.message.split("\n")[0] });
  });
  app.setNotFoundHandler((req, reply) => {
    reply.code(404).send({ code: "NOT_FOUND", message: `no route ${req.method} ${req.url.split("?")[0]}` });
  });

  registerApi(app, manager);

  const metrics = serviceMetrics(manager);
  app.get("/metrics", async (_req, reply) => {
    reply.type(metrics.contentType);
    return metrics.metrics();
  });
  const doc = openApiDocument(opts.version ?? "0.1.0");
  app.get("/openapi.json", async () => doc);

  const { registryPlugin } = await import("./registry/index.js");
  await app.register(registryPlugin, {
    store: manager.store,
    onPushed: (images: ImageRecord[]) => {
      manager.importLocalImage(images);
    },
  });
  return app;
}

/**
 * Checks the token in constant time. Registry clients (docker login, skopeo --creds) send Basic
 * credentials: any user name with the token as password is accepted.
 */
function bearerAuth(token: string) {
  const want = Buffer.from(token);
  const matches = (given: string) => {
    const b = Buffer.from(given);
    return b.length === want.length && timingSafeEqual(b, want);
  };
  return async (req: import("fastify").FastifyRequest, reply: import("fastify").FastifyReply) => {
    if (req.routeOptions.config.public === true) return;
    const header = req.headers.authorization ?? "";
    const [scheme, value = ""] = header.split(" ", 2);
    if (scheme?.toLowerCase() === "bearer" && matches(value)) return;
    if (scheme?.toLowerCase() === "basic") {
      const decoded = Buffer.from(value, "base64").toString("utf8");
      if (matches(decoded.slice(decoded.indexOf(":") + 1))) return;
    }
    const message = header === "" ? "authentication required" : "invalid token";
    if (req.url.startsWith("/v2")) {
      reply
        .code(401)
        .header("www-authenticate", 'Basic realm="kiln"')
        .header("docker-distribution-api-version", "registry/2.0")
        .send({ errors: [{ code: "UNAUTHORIZED", message }] });
      return reply;
    }
    reply.code(401).header("www-authenticate", 'Bearer realm="kiln"').send({ code: "UNAUTHORIZED", message });
    return reply;
  };
}

/** Fastify's own errors (validation, bad JSON, body too large) as KilnErrors. */
function apiError(err: Error & { validation?: unknown; statusCode?: number }): KilnError {
  if (err instanceof KilnError) return err;
  if (err.validation) return new KilnError("INVALID_ARGUMENT", err.message);
  if (err.statusCode !== undefined && err.statusCode < 500)
    return new KilnError("INVALID_ARGUMENT", err.message);
  return toKilnError(err);
}
