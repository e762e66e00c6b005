/** The OpenAPI 3.1 document, built from the route table and the schemas fastify uses. */
import { API_ROUTES } from "./api.js";
import { SHARED_SCHEMAS } from "./schemas.js";

/** Fastify's `Name#` references → OpenAPI component references. */
function toOpenApi(schema: unknown): unknown {
  if (Array.isArray(schema)) return schema.map(toOpenApi);
  if (schema === null || typeof schema !== "object") return schema;
  const out: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(schema)) {
    if (k === "$id") continue;
    if (k === "$ref" && typeof v === "string") out[k] = `#/components/schemas/${v.replace(/#$/, "")}`;
    else out[k] = toOpenApi(v);
  }
  return out;
}

/** `/images/:ref` → `/images/{ref}` */
const openApiPath = (url: string) => url.replace(/:([A-Za-z_]+)/g, "{$1}");

export function openApiDocument(version: string): Record<string, unknown> {
  const paths: Record<string, Record<string, unknown>> = {};
  for (const r of API_ROUTES) {
    const parameters: unknown[] = [];
    for (const [where, schema] of [
      ["path", r.schema.params],
      ["query", r.schema.querystring],
    ] as const) {
      const s = schema as { properties?: Record<string, { description?: string }>; required?: string[] };
      for (const [name, prop] of Object.entries(s?.properties ?? {})) {
        parameters.push({
          name,
          in: where,
          required: where === "path" || (s.required ?? []).includes(name),
          ...(prop.description ? { description: prop.description } : {}),
          schema: toOpenApi(prop),
        });
      }
    }
    const responses: Record<string, unknown> = {};
    for (const [status, schema] of Object.entries(r.schema.response)) {
      const { description, ...rest } = schema as { description?: string };
      responses[status] = {
        description: description ?? "OK",
        content: { [r.produces ?? "application/json"]: { schema: toOpenApi(rest) } },
      };
    }
    paths[openApiPath(r.url)] ??= {};
    paths[openApiPath(r.url)]![r.method.toLowerCase()] = {
      operationId: r.operationId,
      summary: r.summary,
      ...(r.public ? { security: [] } : {}),
      ...(parameters.length > 0 ? { parameters } : {}),
      ...(r.schema.body
        ? {
            requestBody: {
              required: true,
              content: { "application/json": { schema: toOpenApi(r.schema.body) } },
            },
          }
        : {}),
      responses,
    };
  }
  paths["/metrics"] = {
    get: {
      operationId: "metrics",
      summary: "Prometheus metrics (text exposition format)",
      responses: { 200: { description: "OK", content: { "text/plain": { schema: { type: "string" } } } } },
    },
  };
  paths["/openapi.json"] = {
    get: {
      operationId: "openapi",
      summary: "This document",
      responses: {
        200: { description: "OK", content: { "application/json": { schema: { type: "object" } } } },
      },
    },
  };
  const schemas: Record<string, unknown> = {};
  for (const s of SHARED_SCHEMAS) schemas[s.$id] = toOpenApi(s);
  return {
    openapi: "3.1.0",
    info: {
      title: "kiln",
      version,
      description:
        "Turns OCI and Docker images into root filesystems for microVMs. The OCI distribution API (push and pull) is served under /v2/.",
    },
    servers: [{ url: "/" }],
    components: {
      schemas,
      securitySchemes: { bearer: { type: "http", scheme: "bearer" } },
    },
    security: [{ bearer: [] }],
    paths,
  };
}
