// Builds hello.wasm from hello.js: `npm install && npm run build`.
import { componentize } from "@bytecodealliance/componentize-js";
import { writeFile } from "node:fs/promises";

const { component } = await componentize({
  sourcePath: "hello.js",
  witPath: "../../wit",
  worldName: "subscriber",
  // wasmesh grants no stdio, clocks, random or HTTP: leave them out of the component.
  disableFeatures: ["stdio", "random", "clocks", "http", "fetch-event"],
});
await writeFile("hello.wasm", component);
console.log(`hello.wasm: ${component.length} bytes`);
