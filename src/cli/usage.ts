import type { Command, CommanderError, Option } from "commander";
import { KilnError } from "../errors.js";

/**
 * Usage errors: commander's own (unknown option, missing value or argument) become the same
 * INVALID_ARGUMENT error as kiln's flag checks, which main() prints as one line (or JSON) with exit 2.
 */

/** Commander's exits that are no error: help and version. */
const SUCCESS_CODES = new Set(["commander.helpDisplayed", "commander.version", "commander.help"]);

/** Whether commander stopped after printing help or the version (its exit code is the answer). */
export function isHelpOrVersion(err: CommanderError): boolean {
  return SUCCESS_CODES.has(err.code);
}

/** An option as the user may write it: `-o/--output` for `-o, --output <path>`. */
function flagName(flags: string): string {
  const names = flags.split(/[ ,|]+/).filter((f) => f.startsWith("-"));
  return names.length > 0 ? names.join("/") : flags;
}

/** Commander's messages rewritten to name the option first; the rest keep commander's words. */
const REWRITES: [code: string, pattern: RegExp, rewrite: (m: RegExpExecArray) => string][] = [
  ["commander.unknownOption", /^unknown option '(.+)'$/, (m) => `${m[1]}: unknown option`],
  [
    "commander.optionMissingArgument",
    /^option '(.+)' argument missing$/,
    (m) => `${flagName(m[1]!)}: needs a value`,
  ],
  ["commander.missingArgument", /^missing required argument '(.+)'$/, (m) => `<${m[1]}>: missing argument`],
  [
    "commander.invalidArgument",
    /^option '(.+?)' argument '.*' is invalid\. (.*)$/,
    (m) => `${flagName(m[1]!)}: ${m[2]}`,
  ],
];

/** Commander's error as one `--option: what is wrong` line (its "Did you mean" hint kept). */
export function usageError(err: CommanderError): KilnError {
  const [first = "", ...rest] = err.message.replace(/^error: /, "").split("\n");
  const hint = rest
    .join(" ")
    .replace(/^\((.*)\)$/, "$1")
    .trim();
  let message = first;
  for (const [code, pattern, rewrite] of REWRITES) {
    const m = err.code === code ? pattern.exec(first) : null;
    if (m) message = rewrite(m);
  }
  if (hint) message += `; ${hint.charAt(0).toLowerCase()}${hint.slice(1)}`;
  return new KilnError("INVALID_ARGUMENT", message);
}

function* allCommands(cmd: Command): Generator<Command> {
  yield cmd;
  for (const c of cmd.commands) yield* allCommands(c);
}

/**
 * Every command (those added with addCommand inherit nothing) throws instead of exiting, and
 * leaves printing to main(). Required options are checked after unknown options and arguments
 * (commander checks them first), so `--formt` is named as the typo it is.
 */
export function routeUsageErrors(program: Command): void {
  const required = new Map<Command, Option[]>();
  for (const c of allCommands(program)) {
    c.exitOverride();
    c.configureOutput({ outputError: () => {} });
    const mandatory = c.options.filter((o) => o.mandatory);
    for (const o of mandatory) o.mandatory = false;
    if (mandatory.length > 0) required.set(c, mandatory);
  }
  program.hook("preAction", (_program, action) => {
    for (const o of required.get(action) ?? []) {
      if (action.getOptionValue(o.attributeName()) === undefined) {
        throw new KilnError("INVALID_ARGUMENT", `${flagName(o.flags)}: required option not given`);
      }
    }
  });
}
