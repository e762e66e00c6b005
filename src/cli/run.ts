import { main } from "./main.js";

// The entry bin/kiln loads: exit with main()'s code once output is flushed.
process.exitCode = await main(process.argv.slice(2));
