/**
 * A fastify app with only the embedded registry plugin, on 127.0.0.1:0 over a temp store: enough
 * for skopeo, kiln's own client and raw HTTP to talk to it. The service (src/server/app.ts) registers
 * the same plugin with auth in front.
 */

import type { AddressInfo } from "node:net";
import { join } from "node:path";
import Fastify, { type FastifyInstance } from "fastify";
import { registryPlugin } from "../../src/server/registry/index.js";
import type { ImageRecord } from "../../src/store/catalog.js";
import { openStore, type Store } from "../../src/store/store.js";
import { makeTempDir, removeDir } from "../helpers/exec.js";
import type { Registry } from "../helpers/registry.js";

export interface KilnRegistry extends Registry {
  /** The store root (for `kiln --root`). */
  root: string;
  store: Store;
  app: FastifyInstance;
  /** What onPushed was called with, in order. */
  pushes: ImageRecord[][];
}

/** Starts the plugin over a fresh store (or `root`); `stop()` closes it and removes the temp dir. */
export async function startKilnRegistry(opts: { root?: string } = {}): Promise<KilnRegistry> {
  const dir = opts.root === undefined ? await makeTempDir("kiln-registry") : undefined;
  const root = opts.root ?? join(dir!, "store");
  const store = await openStore(root);
  const pushes: ImageRecord[][] = [];
  const app = Fastify({ logger: false });
  await app.register(registryPlugin, { store, onPushed: (images) => void pushes.push(images) });
  await app.listen({ host: "127.0.0.1", port: 0 });
  const { port } = app.server.address() as AddressInfo;
  let stopped = false;
  return {
    host: `127.0.0.1:${port}`,
    url: `http://127.0.0.1:${port}`,
    auth: "none",
    tls: false,
    users: [],
    storageDir: root,
    pid: process.pid,
    log: () => "",
    root,
    store,
    app,
    pushes,
    async stop() {
      if (stopped) return;
      stopped = true;
      await app.close();
      store.close();
      if (dir !== undefined) await removeDir(dir);
    },
  };
}
