/** KilnError codes → HTTP statuses, and the JSON error body every API route answers with. */
import type { ErrorCode } from "../errors.js";

const STATUS: Record<ErrorCode, number> = {
  INVALID_REFERENCE: 400,
  INVALID_PLATFORM: 400,
  INVALID_ARGUMENT: 400,
  INVALID_ARCHIVE: 422,
  INVALID_MANIFEST: 422,
  UNAUTHORIZED: 401,
  CREDENTIALS: 401,
  DENIED: 403,
  NOT_FOUND: 404,
  AMBIGUOUS_REF: 409,
  UNSUPPORTED_MEDIA_TYPE: 422,
  UNSUPPORTED_ARCHIVE: 422,
  PLATFORM_NOT_FOUND: 422,
  PLATFORM_MISMATCH: 422,
  DIGEST_MISMATCH: 502,
  SIZE_MISMATCH: 502,
  NETWORK: 502,
  TIMEOUT: 504,
  REGISTRY_ERROR: 502,
  TLS: 502,
  TOO_LARGE: 507,
  STORE: 503,
  INTERNAL: 500,
};

export function httpStatus(code: ErrorCode): number {
  return STATUS[code] ?? 500;
}

export interface ErrorBody {
  code: string;
  message: string;
}
