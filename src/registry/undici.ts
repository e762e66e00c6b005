/**
 * The two parts of undici kiln uses, loaded on their own: the whole package (fetch, websockets,
 * caches, mocks) takes ~150 ms to load, these ~30 ms, and a warm `kiln pull` is mostly start-up.
 * undici has no `exports` map, so these paths are reachable; package-lock pins the version.
 */
import { createRequire } from "node:module";
import type * as Undici from "undici";

const require = createRequire(import.meta.url);
const Dispatcher = require("undici/lib/dispatcher/dispatcher.js") as { prototype: object };
const api = require("undici/lib/api/index.js") as object;
// What undici's index does: give every dispatcher request/stream/pipeline/connect/upgrade.
if (!("request" in Dispatcher.prototype)) Object.assign(Dispatcher.prototype, api);

export const Agent = require("undici/lib/dispatcher/agent.js") as typeof Undici.Agent;
export type Agent = Undici.Agent;
export type { Dispatcher } from "undici";
