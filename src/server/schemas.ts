/**
 * JSON schemas of the HTTP API. Fastify validates requests and serializes responses with them, and
 * the OpenAPI document is built from the same objects, so the document cannot drift from the routes.
 */
import { EXPORT_FORMATS } from "../build/formats.js";

const nullable = (schema: Record<string, unknown>) => ({ anyOf: [schema, { type: "null" }] });
const stringList = { type: "array", items: { type: "string" } };

export const ImageSchema = {
  $id: "Image",
  type: "object",
  description: "One requested (name, format, platform) and its build.",
  required: [
    "id",
    "name",
    "digest",
    "format",
    "platform",
    "status",
    "queuePosition",
    "error",
    "size",
    "entrypoint",
    "cmd",
    "env",
    "workingDir",
    "created",
    "updatedAt",
    "artifact",
  ],
  properties: {
    id: { type: "integer" },
    name: { type: "string", description: "Normalized reference, e.g. docker.io/library/alpine:3.20" },
    digest: { ...nullable({ type: "string" }), description: "Manifest digest, once known" },
    format: { type: "string", enum: [...EXPORT_FORMATS] },
    platform: { type: "string", description: "os/arch[/variant]" },
    status: { type: "string", enum: ["pending", "pulling", "converting", "ready", "failed"] },
    queuePosition: {
      ...nullable({ type: "integer" }),
      description: "Pending: 1 + unfinished builds ahead (1 = next); 0 while building; null once ended",
    },
    error: nullable({
      type: "object",
      required: ["code", "message"],
      properties: { code: { type: "string" }, message: { type: "string" } },
    }),
    size: { ...nullable({ type: "integer" }), description: "Artifact bytes once ready" },
    entrypoint: nullable(stringList),
    cmd: nullable(stringList),
    env: stringList,
    workingDir: { type: "string" },
    created: { type: "string", format: "date-time" },
    updatedAt: { type: "string", format: "date-time" },
    artifact: { ...nullable({ type: "string" }), description: "Absolute path of the artifact once ready" },
  },
} as const;

export const ErrorSchema = {
  $id: "Error",
  type: "object",
  required: ["code", "message"],
  properties: {
    code: { type: "string", description: "Stable error code, e.g. NOT_FOUND, INVALID_REFERENCE" },
    message: { type: "string" },
  },
} as const;

export const CreateImageSchema = {
  $id: "CreateImage",
  type: "object",
  required: ["name"],
  additionalProperties: false,
  properties: {
    name: { type: "string", minLength: 1, description: "Image reference, e.g. alpine:3.20" },
    format: { type: "string", enum: [...EXPORT_FORMATS], description: "Default: the service's (ext4)" },
    platform: { type: "string", description: "os/arch[/variant]; default the host's" },
  },
} as const;

export const CreateExportSchema = {
  $id: "CreateExport",
  type: "object",
  required: ["format"],
  additionalProperties: false,
  properties: {
    format: { type: "string", enum: [...EXPORT_FORMATS] },
  },
} as const;

export const SHARED_SCHEMAS = [ImageSchema, ErrorSchema, CreateImageSchema, CreateExportSchema] as const;
