/**
 * The image API routes, as one table: fastify registers them and openapi.ts documents them from the
 * same entries.
 */
import type { FastifyInstance, FastifyReply, FastifyRequest } from "fastify";
import type { ImageManager, ServiceImage } from "../build/manager.js";

const ref = (name: string) => ({ $ref: `${name}#` });
const errors = {
  400: { description: "Invalid reference, format or platform", ...ref("Error") },
  401: { description: "Missing or wrong bearer token", ...ref("Error") },
  404: { description: "No such image", ...ref("Error") },
  409: { description: "The reference names several images", ...ref("Error") },
};
const refParam = {
  type: "object",
  required: ["ref"],
  properties: {
    ref: {
      type: "string",
      description: "Reference, normalized reference or manifest digest prefix (URL-encoded)",
    },
  },
};
const selectQuery = {
  type: "object",
  additionalProperties: false,
  properties: {
    format: { type: "string", description: "Which format, when the image was built in several" },
    platform: { type: "string", description: "Which platform, when the image was built for several" },
  },
};

export interface RouteDef {
  method: "GET" | "POST" | "DELETE";
  url: string;
  operationId: string;
  summary: string;
  /** Needs no token (health checks). */
  public?: boolean;
  schema: {
    params?: object;
    querystring?: object;
    body?: object;
    response: Record<number, object>;
  };
  /** Non-JSON responses (metrics text) are described here for OpenAPI. */
  produces?: string;
  handler(m: ImageManager, req: FastifyRequest, reply: FastifyReply): unknown;
}

type Params = { ref: string };
type Select = { format?: string; platform?: string };

export const API_ROUTES: RouteDef[] = [
  {
    method: "POST",
    url: "/images",
    operationId: "createImage",
    summary: "Request an image in a format; returns at once with its status and queue position",
    schema: {
      body: ref("CreateImage"),
      response: {
        200: { description: "Already ready", ...ref("Image") },
        202: { description: "Queued, or joined a build already queued or running", ...ref("Image") },
        400: errors[400],
        401: errors[401],
      },
    },
    handler: (m, req, reply) => {
      const body = req.body as { name: string; format?: string; platform?: string };
      return accepted(reply, m.createImage(body));
    },
  },
  {
    method: "GET",
    url: "/images",
    operationId: "listImages",
    summary: "Every requested image with its status",
    schema: {
      querystring: {
        type: "object",
        additionalProperties: false,
        properties: {
          status: { type: "string", enum: ["pending", "pulling", "converting", "ready", "failed"] },
        },
      },
      response: { 200: { type: "array", items: ref("Image") }, 401: errors[401] },
    },
    handler: (m, req) => {
      const { status } = req.query as { status?: string };
      return m.listImages().filter((i) => status === undefined || i.status === status);
    },
  },
  {
    method: "GET",
    url: "/images/:ref",
    operationId: "getImage",
    summary: "One image by reference or digest prefix",
    schema: {
      params: refParam,
      querystring: selectQuery,
      response: { 200: ref("Image"), 400: errors[400], 401: errors[401], 404: errors[404], 409: errors[409] },
    },
    handler: (m, req) => m.getImage((req.params as Params).ref, req.query as Select),
  },
  {
    method: "DELETE",
    url: "/images/:ref",
    operationId: "deleteImage",
    summary: "Delete an image (all formats, and the image from the store), or one format of it",
    schema: {
      params: refParam,
      querystring: selectQuery,
      response: {
        200: { description: "What was deleted", type: "array", items: ref("Image") },
        400: errors[400],
        401: errors[401],
        404: errors[404],
        409: errors[409],
      },
    },
    handler: (m, req) => m.deleteImage((req.params as Params).ref, req.query as Select),
  },
  {
    method: "POST",
    url: "/images/:ref/exports",
    operationId: "createExport",
    summary: "Request another format of an image the service has",
    schema: {
      params: refParam,
      body: ref("CreateExport"),
      response: {
        200: { description: "Already ready", ...ref("Image") },
        202: { description: "Queued, or joined", ...ref("Image") },
        400: errors[400],
        401: errors[401],
        404: errors[404],
        409: errors[409],
      },
    },
    handler: (m, req, reply) => {
      const present = m.getImage((req.params as Params).ref);
      const { format } = req.body as { format: string };
      return accepted(reply, m.createImage({ name: present.name, format, platform: present.platform }));
    },
  },
  {
    method: "GET",
    url: "/healthz",
    operationId: "health",
    summary: "Liveness: 200 while the service runs",
    public: true,
    schema: {
      response: {
        200: {
          type: "object",
          required: ["status"],
          properties: { status: { type: "string", enum: ["ok"] } },
        },
      },
    },
    handler: () => ({ status: "ok" }),
  },
];

/** 200 for an image already ready, 202 for one queued or building. */
function accepted(reply: FastifyReply, image: ServiceImage): ServiceImage {
  reply.code(image.status === "ready" ? 200 : 202);
  return image;
}

export function registerApi(app: FastifyInstance, manager: ImageManager): void {
  for (const r of API_ROUTES) {
    app.route({
      method: r.method,
      url: r.url,
      schema: r.schema,
      config: { public: r.public === true },
      handler: (req, reply) => r.handler(manager, req, reply),
    });
  }
}
