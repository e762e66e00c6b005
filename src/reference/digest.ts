import { KilnError } from "../errors.js";

/** A content digest, `algorithm:hex`, as in the OCI image spec. */
export interface Digest {
  readonly algorithm: string;
  readonly hex: string;
  /** `algorithm:hex` */
  readonly value: string;
}

const ALGORITHM = /^[a-z0-9]+(?:[.+_-][a-z0-9]+)*$/;
const KNOWN_HEX_LENGTH: Record<string, number> = { sha256: 64, sha512: 128 };

/** Parses and validates `sha256:<64 hex>` (or sha512). Anything else → INVALID_REFERENCE. */
export function parseDigest(text: string): Digest {
  const colon = text.indexOf(":");
  if (colon <= 0)
    throw new KilnError("INVALID_REFERENCE", `invalid digest "${text}": expected algorithm:hex`);
  const algorithm = text.slice(0, colon);
  const hex = text.slice(colon + 1);
  if (!ALGORITHM.test(algorithm)) {
    throw new KilnError("INVALID_REFERENCE", `invalid digest "${text}": bad algorithm "${algorithm}"`);
  }
  const want = KNOWN_HEX_LENGTH[algorithm];
  if (want === undefined) {
    throw new KilnError(
      "INVALID_REFERENCE",
      `invalid digest "${text}": unsupported algorithm "${algorithm}"`,
    );
  }
  if (hex.length !== want || !/^[0-9a-f]+$/.test(hex)) {
    throw new KilnError(
      "INVALID_REFERENCE",
      `invalid digest "${text}": ${algorithm} needs ${want} lowercase hex characters`,
    );
  }
  return { algorithm, hex, value: `${algorithm}:${hex}` };
}

export function isDigest(text: string): boolean {
  try {
    parseDigest(text);
    return true;
  } catch {
    return false;
  }
}

export function sha256Digest(hex: string): Digest {
  return parseDigest(`sha256:${hex}`);
}
