/** Reading registry responses: bounded bodies, the registry's own error messages, status → KilnError. */
import type { Readable } from "node:stream";
import { KilnError } from "../errors.js";
import type { Response, Transport } from "./transport.js";
import { networkError } from "./transport.js";

const ERROR_BODY_LIMIT = 64 * 1024;

/** Drops a body we will not read; undici reports a destroyed unread body as an error, so one is listened for. */
export function discard(body: Readable): void {
  body.on("error", () => {});
  body.destroy();
}

export function header(res: Response, name: string): string | undefined {
  const v = res.headers[name];
  return Array.isArray(v) ? v[0] : v;
}

/** Reads a whole body of at most `max` bytes; more → TOO_LARGE, a broken stream → a retryable error. */
export async function readCapped(
  res: Response,
  max: number,
  what: string,
  transport: Transport,
): Promise<Buffer> {
  const declared = Number(header(res, "content-length"));
  if (Number.isFinite(declared) && declared > max) {
    discard(res.body);
    throw new KilnError("TOO_LARGE", `${what} is ${declared} bytes, over the ${max}-byte limit`);
  }
  const chunks: Buffer[] = [];
  let total = 0;
  try {
    for await (const chunk of res.body) {
      total += (chunk as Buffer).length;
      if (total > max) {
        discard(res.body);
        throw new KilnError("TOO_LARGE", `${what} is over the ${max}-byte limit`);
      }
      chunks.push(chunk as Buffer);
    }
  } catch (err) {
    throw networkError(err, res.url, transport.timeouts);
  }
  return Buffer.concat(chunks, total);
}

/**
 * The message a registry or token server put in an error body: distribution's
 * `{"errors":[{"code","message"}]}`, OAuth's `error_description`, Docker Hub's `details`, or a
 * short text line. Reads at most 64 KiB and never throws.
 */
export async function errorMessage(res: Response): Promise<{ message: string | undefined; codes: string[] }> {
  let text = "";
  try {
    for await (const chunk of res.body) {
      text += (chunk as Buffer).toString("utf8");
      if (text.length > ERROR_BODY_LIMIT) {
        discard(res.body);
        break;
      }
    }
  } catch {
    // A broken error body still leaves the status to report.
  }
  const codes: string[] = [];
  let message: string | undefined;
  try {
    const doc = JSON.parse(text) as Record<string, unknown>;
    if (Array.isArray(doc.errors)) {
      const parts: string[] = [];
      for (const e of doc.errors as { code?: unknown; message?: unknown }[]) {
        if (typeof e?.code === "string") codes.push(e.code);
        if (typeof e?.message === "string" && e.message) parts.push(e.message);
        else if (typeof e?.code === "string") parts.push(e.code.toLowerCase().replace(/_/g, " "));
      }
      if (parts.length) message = parts.join("; ");
    } else if (typeof doc.error_description === "string") {
      message = doc.error_description;
    } else if (typeof doc.details === "string") {
      message = doc.details;
    } else if (typeof doc.error === "string") {
      message = doc.error;
    } else if (typeof doc.message === "string") {
      message = doc.message;
    }
  } catch {
    const line = text.trim().split("\n")[0]?.trim();
    if (line && !line.startsWith("<") && line.length <= 200) message = line;
  }
  return { message, codes };
}

export interface StatusContext {
  /** What was asked for, for messages: `manifest 127.0.0.1:5000/foo:bar`. */
  subject: string;
  /** The NOT_FOUND message: `manifest unknown: 127.0.0.1:5000/foo:bar`. */
  notFound: string;
  /** `host/repository`, to say so when the registry reports the repository itself unknown. */
  repository?: string | undefined;
}

/** Maps an unsuccessful status (other than 401, which auth handles) to a KilnError with the registry's words. */
export async function statusError(res: Response, ctx: StatusContext): Promise<KilnError> {
  const { message, codes } = await errorMessage(res);
  const host = res.url.host;
  const suffix = message ? `: ${message}` : "";
  const details = { status: res.status, host, registryCodes: codes };
  switch (res.status) {
    case 404: {
      if (ctx.repository && codes.includes("NAME_UNKNOWN")) {
        return new KilnError("NOT_FOUND", `repository unknown: ${ctx.repository}`, { details });
      }
      // Repeat the registry's words only when they add something ("repository name not known").
      const kind = ctx.notFound.split(":")[0]!.toLowerCase();
      const extra = message && !message.toLowerCase().startsWith(kind) ? ` (${message})` : "";
      return new KilnError("NOT_FOUND", `${ctx.notFound}${extra}`, { details });
    }
    case 401:
      return new KilnError("UNAUTHORIZED", `${host} requires authentication for ${ctx.subject}${suffix}`, {
        details,
      });
    case 403:
      return new KilnError("DENIED", `${host} denied access to ${ctx.subject}${suffix}`, { details });
    case 408:
      return new KilnError("TIMEOUT", `${host} timed out serving ${ctx.subject} (408)${suffix}`, { details });
    case 429:
      return new KilnError(
        "REGISTRY_ERROR",
        `${host} is rate limiting requests (429) for ${ctx.subject}${suffix}`,
        {
          details,
        },
      );
    default:
      return new KilnError("REGISTRY_ERROR", `${host} answered ${res.status} for ${ctx.subject}${suffix}`, {
        details,
      });
  }
}
