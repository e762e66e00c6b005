/** Errors in the OCI distribution format: `{"errors":[{"code","message","detail"}]}` with its status. */
import { isKilnError, type KilnError } from "../../errors.js";

export type DistributionCode =
  | "BLOB_UNKNOWN"
  | "BLOB_UPLOAD_INVALID"
  | "BLOB_UPLOAD_UNKNOWN"
  | "DIGEST_INVALID"
  | "MANIFEST_BLOB_UNKNOWN"
  | "MANIFEST_INVALID"
  | "MANIFEST_UNKNOWN"
  | "NAME_INVALID"
  | "NAME_UNKNOWN"
  | "SIZE_INVALID"
  | "PAGINATION_NUMBER_INVALID"
  | "RANGE_INVALID"
  | "UNAUTHORIZED"
  | "DENIED"
  | "UNSUPPORTED"
  | "NOT_FOUND"
  | "UNKNOWN";

const STATUS: Record<DistributionCode, number> = {
  BLOB_UNKNOWN: 404,
  BLOB_UPLOAD_INVALID: 400,
  BLOB_UPLOAD_UNKNOWN: 404,
  DIGEST_INVALID: 400,
  MANIFEST_BLOB_UNKNOWN: 400,
  MANIFEST_INVALID: 400,
  MANIFEST_UNKNOWN: 404,
  NAME_INVALID: 400,
  NAME_UNKNOWN: 404,
  SIZE_INVALID: 400,
  PAGINATION_NUMBER_INVALID: 400,
  RANGE_INVALID: 416,
  UNAUTHORIZED: 401,
  DENIED: 403,
  UNSUPPORTED: 405,
  NOT_FOUND: 404,
  UNKNOWN: 500,
};

export class RegistryError extends Error {
  readonly code: DistributionCode;
  readonly status: number;
  readonly detail: unknown;
  /** Extra response headers (Range on a 416, so the client knows where to resume). */
  readonly headers: Record<string, string>;

  constructor(
    code: DistributionCode,
    message: string,
    opts: { detail?: unknown; status?: number; headers?: Record<string, string>; cause?: unknown } = {},
  ) {
    super(message, opts.cause === undefined ? undefined : { cause: opts.cause });
    this.name = "RegistryError";
    this.code = code;
    this.status = opts.status ?? STATUS[code];
    this.detail = opts.detail;
    this.headers = opts.headers ?? {};
  }

  body(): { errors: { code: string; message: string; detail?: unknown }[] } {
    const e: { code: string; message: string; detail?: unknown } = { code: this.code, message: this.message };
    if (this.detail !== undefined) e.detail = this.detail;
    return { errors: [e] };
  }
}

/** Kiln's own codes as the distribution API reports them; anything unexpected is a 500 UNKNOWN. */
export function toRegistryError(err: unknown): RegistryError {
  if (err instanceof RegistryError) return err;
  if (isKilnError(err)) return fromKilnError(err);
  const status = (err as { statusCode?: unknown } | undefined)?.statusCode;
  const message = err instanceof Error ? err.message : String(err);
  if (typeof status === "number" && status >= 400 && status < 500) {
    // fastify's own refusals (a malformed Content-Type, a bad URL).
    const code: DistributionCode =
      status === 413 ? "SIZE_INVALID" : status === 404 ? "NOT_FOUND" : "UNSUPPORTED";
    return new RegistryError(code, message, { status, cause: err });
  }
  return new RegistryError("UNKNOWN", message, { cause: err });
}

function fromKilnError(err: KilnError): RegistryError {
  const opts = { detail: err.details, cause: err };
  switch (err.code) {
    case "UNAUTHORIZED":
    case "DENIED":
      return new RegistryError(err.code, err.message, opts);
    case "DIGEST_MISMATCH":
      return new RegistryError("DIGEST_INVALID", err.message, opts);
    case "SIZE_MISMATCH":
      return new RegistryError("SIZE_INVALID", err.message, opts);
    case "INVALID_MANIFEST":
    case "UNSUPPORTED_MEDIA_TYPE":
    case "PLATFORM_NOT_FOUND":
    case "PLATFORM_MISMATCH":
      return new RegistryError("MANIFEST_INVALID", err.message, opts);
    case "TOO_LARGE":
      return new RegistryError("SIZE_INVALID", err.message, { ...opts, status: 413 });
    case "INVALID_REFERENCE":
    case "INVALID_ARGUMENT":
      return new RegistryError("NAME_INVALID", err.message, opts);
    default:
      return new RegistryError("UNKNOWN", err.message, opts);
  }
}
