/**
 * One error class for everything kiln reports to a user. The `code` is stable: the CLI prints it
 * and exits non-zero, the HTTP API maps it to a status, scripts may match on it.
 */
export type ErrorCode =
  | "NOT_FOUND"
  | "UNAUTHORIZED"
  | "DENIED"
  | "DIGEST_MISMATCH"
  | "SIZE_MISMATCH"
  | "UNSUPPORTED_MEDIA_TYPE"
  | "PLATFORM_NOT_FOUND"
  | "PLATFORM_MISMATCH"
  | "AMBIGUOUS_REF"
  | "INVALID_REFERENCE"
  | "INVALID_PLATFORM"
  | "INVALID_ARCHIVE"
  | "INVALID_MANIFEST"
  | "INVALID_ARGUMENT"
  | "UNSUPPORTED_ARCHIVE"
  | "TOO_LARGE"
  | "NETWORK"
  | "TIMEOUT"
  | "REGISTRY_ERROR"
  | "TLS"
  | "CREDENTIALS"
  | "STORE"
  | "INTERNAL";

export class KilnError extends Error {
  readonly code: ErrorCode;
  /** Extra machine-readable facts (e.g. the platforms that exist, the candidates of an ambiguous ref). */
  readonly details: Record<string, unknown> | undefined;

  constructor(
    code: ErrorCode,
    message: string,
    options?: { cause?: unknown; details?: Record<string, unknown> },
  ) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.name = "KilnError";
    this.code = code;
    this.details = options?.details;
  }
}

export function isKilnError(err: unknown, code?: ErrorCode): err is KilnError {
  return err instanceof KilnError && (code === undefined || err.code === code);
}

/** Wraps anything thrown into a KilnError so callers print one line with a code. */
export function toKilnError(err: unknown): KilnError {
  if (err instanceof KilnError) return err;
  const e = err as NodeJS.ErrnoException;
  if (e && typeof e === "object" && typeof e.code === "string") {
    if (e.code === "ENOENT") return new KilnError("NOT_FOUND", e.message, { cause: err });
    if (e.code === "ENOSPC" || e.code === "EACCES" || e.code === "EROFS" || e.code === "EDQUOT") {
      return new KilnError("STORE", e.message, { cause: err });
    }
  }
  return new KilnError("INTERNAL", e instanceof Error ? e.message : String(err), { cause: err });
}
