/** The HTTP statuses the API answers for each error code (the list, and the rest). */
import assert from "node:assert/strict";
import { describe, it } from "node:test";
import type { ErrorCode } from "../../src/errors.js";
import { httpStatus } from "../../src/server/errors.js";

describe("error codes → HTTP statuses", () => {
  it("maps each code as the API documents", () => {
    const want: [ErrorCode, number][] = [
      ["INVALID_REFERENCE", 400],
      ["INVALID_PLATFORM", 400],
      ["INVALID_ARGUMENT", 400],
      ["UNAUTHORIZED", 401],
      ["CREDENTIALS", 401],
      ["DENIED", 403],
      ["NOT_FOUND", 404],
      ["AMBIGUOUS_REF", 409],
      ["UNSUPPORTED_MEDIA_TYPE", 422],
      ["UNSUPPORTED_ARCHIVE", 422],
      ["PLATFORM_NOT_FOUND", 422],
      ["NETWORK", 502],
      ["REGISTRY_ERROR", 502],
      ["TLS", 502],
      ["DIGEST_MISMATCH", 502],
      ["TIMEOUT", 504],
      ["TOO_LARGE", 507],
      ["INTERNAL", 500],
    ];
    for (const [code, status] of want) assert.equal(httpStatus(code), status, code);
  });
});
