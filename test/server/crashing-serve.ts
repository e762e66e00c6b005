/**
 * `kiln serve` as the library builds it, except that the process SIGKILLs itself the moment a build
 * reaches the phase given as argv[3]: a crash at a known point, without timing. argv[2] is the store.
 */
import { ImageManager } from "../../src/build/manager.js";
import { buildServer } from "../../src/server/app.js";

const [root, crashAt] = process.argv.slice(2);
const manager = await ImageManager.open({
  root,
  concurrency: 1,
  onPhase: (image) => {
    if (image.status === crashAt) process.kill(process.pid, "SIGKILL");
  },
});
const app = await buildServer({ manager });
await app.listen({ host: "127.0.0.1", port: 0 });
const address = app.server.address();
process.stderr.write(
  `crashing-serve: listening on http://127.0.0.1:${typeof address === "object" && address ? address.port : 0}\n`,
);
manager.start();
