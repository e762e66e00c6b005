/**
 * A small fault-injecting HTTP proxy for tests: a node:http server on 127.0.0.1 that forwards every
 * request to a real registry (plain HTTP) and, for requests matching a rule, answers a status,
 * cuts the connection after some body bytes, flips a body byte, or holds requests at a barrier
 * until enough of them arrived. Every request is recorded with its Range header and the status the
 * client got.
 */
import {
  Agent,
  createServer,
  request as httpRequest,
  type IncomingMessage,
  type OutgoingHttpHeaders,
  type ServerResponse,
} from "node:http";
import type { AddressInfo } from "node:net";

export type FaultAction =
  /** Answer this status (not forwarded); e.g. 500, 429 with `Retry-After`, 401 with `WWW-Authenticate`. */
  | { status: number; headers?: Record<string, string>; body?: string }
  /** Forward, send the headers and the first `cutAfter` body bytes, then close the connection. */
  | { cutAfter: number }
  /** Forward with the body byte at offset `corruptAt` flipped (same length). */
  | { corruptAt: number }
  /** Hold matching requests until `barrier` of them arrived, then forward them all. */
  | { barrier: number };

export interface FaultRule {
  /** Default: any method. */
  method?: string;
  /** Matched against the request path (with query). */
  path: RegExp;
  /** How many matching requests the rule affects (default 1; a barrier's default is its count). */
  times?: number;
  action: FaultAction;
}

export interface RuleHandle {
  readonly rule: FaultRule;
  /** Requests the rule has affected so far. */
  readonly hits: number;
  /** Stops the rule from matching further requests (held ones are released). */
  remove(): void;
}

export interface RecordedRequest {
  method: string;
  path: string;
  /** The Range header, if any. */
  range: string | undefined;
  /** The status the client got (undefined while in flight or when upstream failed to answer). */
  status: number | undefined;
  /** Which fault was applied, if any. */
  fault: "status" | "cut" | "corrupt" | "barrier" | undefined;
  /** Body bytes sent to the client. */
  bytes: number;
  /** Order of arrival and of completion among all requests' start and end events (not times). */
  startSeq: number;
  endSeq: number | undefined;
}

export interface FaultProxy {
  /** `127.0.0.1:PORT`, to use in image references instead of the registry's host. */
  host: string;
  url: string;
  /** Every request so far, oldest first. */
  requests: RecordedRequest[];
  addRule(rule: FaultRule): RuleHandle;
  /** Removes every rule and forgets recorded requests. */
  reset(): void;
  /** Requests matching method and path, for assertions. */
  matching(method: string, path: RegExp): RecordedRequest[];
  /** The most matching requests that were in flight at once (from event order, not timing). */
  maxConcurrent(method: string, path: RegExp): number;
  close(): Promise<void>;
}

export interface FaultProxyOptions {
  /** A held barrier request gets 504 after this long without the barrier filling (default 30 s). */
  barrierTimeoutMs?: number;
}

interface LiveRule {
  rule: FaultRule;
  times: number;
  hits: number;
  removed: boolean;
  /** Barrier: the releases of requests waiting for the barrier to fill. */
  waiting: ((go: boolean) => void)[];
}

/** Starts a proxy on 127.0.0.1 in front of `upstream` (`http://127.0.0.1:PORT` or `127.0.0.1:PORT`). */
export async function startFaultProxy(upstream: string, opts: FaultProxyOptions = {}): Promise<FaultProxy> {
  const target = new URL(upstream.includes("://") ? upstream : `http://${upstream}`);
  if (target.protocol !== "http:")
    throw new Error(`fault proxy forwards to plain HTTP only, not ${upstream}`);
  const barrierTimeoutMs = opts.barrierTimeoutMs ?? 30_000;
  const agent = new Agent({ keepAlive: true });
  const rules: LiveRule[] = [];
  const requests: RecordedRequest[] = [];
  let seq = 0;

  const take = (req: IncomingMessage): LiveRule | undefined => {
    const rule = rules.find(
      (r) =>
        !r.removed &&
        r.hits < r.times &&
        (r.rule.method === undefined || r.rule.method.toUpperCase() === req.method) &&
        r.rule.path.test(req.url ?? ""),
    );
    if (rule) rule.hits++;
    return rule;
  };

  const server = createServer((req, res) => {
    const rec: RecordedRequest = {
      method: req.method ?? "GET",
      path: req.url ?? "/",
      range: req.headers.range,
      status: undefined,
      fault: undefined,
      bytes: 0,
      startSeq: seq++,
      endSeq: undefined,
    };
    res.on("close", () => {
      rec.endSeq = seq++;
    });
    requests.push(rec);
    const live = take(req);
    const action = live?.rule.action;
    if (action && "status" in action) {
      rec.fault = "status";
      req.resume();
      const body =
        action.body ?? JSON.stringify({ errors: [{ code: "UNKNOWN", message: "injected fault" }] });
      rec.status = action.status;
      rec.bytes = Buffer.byteLength(body);
      res.writeHead(action.status, { "content-type": "application/json", ...action.headers });
      res.end(body);
      return;
    }
    if (live && action && "barrier" in action) {
      rec.fault = "barrier";
      const go = new Promise<boolean>((resolve) => live.waiting.push(resolve));
      if (live.hits >= action.barrier || live.removed) {
        for (const release of live.waiting.splice(0)) release(true);
      }
      const timer = setTimeout(() => {
        const i = live.waiting.length;
        for (const release of live.waiting.splice(0, i)) release(false);
      }, barrierTimeoutMs);
      void go.then((ok) => {
        clearTimeout(timer);
        if (ok) forward(req, res, rec, undefined);
        else {
          rec.status = 504;
          res.writeHead(504, { "content-type": "text/plain" });
          res.end(`barrier ${live.rule.path} did not fill within ${barrierTimeoutMs} ms\n`);
        }
      });
      return;
    }
    forward(req, res, rec, action as { cutAfter: number } | { corruptAt: number } | undefined);
  });

  function forward(
    req: IncomingMessage,
    res: ServerResponse,
    rec: RecordedRequest,
    fault: { cutAfter: number } | { corruptAt: number } | undefined,
  ): void {
    const headers: OutgoingHttpHeaders = { ...req.headers };
    const up = httpRequest(
      {
        host: target.hostname,
        port: target.port,
        method: req.method,
        path: req.url,
        headers,
        agent,
      },
      (upRes) => {
        rec.status = upRes.statusCode;
        res.writeHead(upRes.statusCode ?? 502, upRes.headers);
        let offset = 0;
        upRes.on("data", (chunk: Buffer) => {
          let data = chunk;
          if (fault && "cutAfter" in fault) {
            const room = fault.cutAfter - offset;
            if (room <= chunk.length) {
              rec.fault = "cut";
              if (room > 0) res.write(chunk.subarray(0, room));
              rec.bytes += Math.max(0, room);
              offset += Math.max(0, room);
              upRes.destroy();
              // end(), not destroy(): the bytes already written reach the client before the FIN.
              res.socket?.end();
              return;
            }
          } else if (fault && "corruptAt" in fault) {
            const at = fault.corruptAt - offset;
            if (at >= 0 && at < chunk.length) {
              rec.fault = "corrupt";
              data = Buffer.from(chunk);
              data[at] = data[at]! ^ 0xff;
            }
          }
          offset += data.length;
          rec.bytes += data.length;
          if (!res.write(data)) {
            upRes.pause();
            res.once("drain", () => upRes.resume());
          }
        });
        upRes.on("end", () => {
          if (rec.fault !== "cut") res.end();
        });
        upRes.on("error", () => res.destroy());
      },
    );
    up.on("error", () => {
      if (!res.headersSent) {
        rec.status = 502;
        res.writeHead(502, { "content-type": "text/plain" });
        res.end("upstream failed\n");
      } else res.destroy();
    });
    res.on("close", () => up.destroy());
    req.pipe(up);
  }

  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => resolve());
  });
  const { port } = server.address() as AddressInfo;
  let closed: Promise<void> | undefined;

  return {
    host: `127.0.0.1:${port}`,
    url: `http://127.0.0.1:${port}`,
    requests,
    addRule(rule) {
      const a = rule.action;
      const live: LiveRule = {
        rule,
        times: rule.times ?? ("barrier" in a ? a.barrier : 1),
        hits: 0,
        removed: false,
        waiting: [],
      };
      rules.push(live);
      return {
        rule,
        get hits() {
          return live.hits;
        },
        remove() {
          live.removed = true;
          for (const release of live.waiting.splice(0)) release(true);
        },
      };
    },
    reset() {
      for (const r of rules.splice(0)) {
        r.removed = true;
        for (const release of r.waiting.splice(0)) release(true);
      }
      requests.length = 0;
    },
    matching(method, path) {
      return requests.filter((r) => r.method === method && path.test(r.path));
    },
    maxConcurrent(method, path) {
      const events = requests
        .filter((r) => r.method === method && path.test(r.path))
        .flatMap((r) => [
          [r.startSeq, 1],
          [r.endSeq ?? Number.POSITIVE_INFINITY, -1],
        ])
        .sort((a, b) => a[0]! - b[0]!);
      let now = 0;
      let max = 0;
      for (const [, d] of events) {
        now += d!;
        max = Math.max(max, now);
      }
      return max;
    },
    close() {
      closed ??= new Promise<void>((resolve) => {
        for (const r of rules) for (const release of r.waiting.splice(0)) release(false);
        server.close(() => resolve());
        server.closeAllConnections();
        agent.destroy();
      });
      return closed;
    },
  };
}
