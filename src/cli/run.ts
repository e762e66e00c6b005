import { setFlagsFromString } from "node:v8";

// undici parses HTTP with a WebAssembly module. V8 compiles it fast (Liftoff), then re-compiles it
// optimized on a background thread, and Node waits for that thread before exiting: ~200 ms added
// to every short command. HTTP parsing is a tiny share of a pull, so the baseline code is kept.
setFlagsFromString("--liftoff-only");

const { main } = await import("./main.js");
// The entry bin/kiln loads: exit with main()'s code once output is flushed.
process.exitCode = await main(process.argv.slice(2));
