export * from "./digest.js";
export * from "./reference.js";
