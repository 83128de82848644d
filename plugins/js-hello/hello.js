// A wasmesh subscriber written in JavaScript (the `subscriber` world of wit/plugin.wit), made a
// component by componentize-js. It logs each event through the host's `log` import and answers
// an event of type `com.example.ping` with a reply of type `com.example.pong` carrying the same
// data; every other event is acknowledged. Built without stdio (build.mjs), `console.log` goes
// nowhere: write through `log`.
import { log } from "wasmesh:plugin/log@0.1.0";
import { get } from "wasmesh:plugin/config@0.1.0";

export const handler = {
  handle(event) {
    const a = event.attributes;
    const greeting = get("greeting") ?? "hello";
    log("info", `${greeting}: ${a.type} from ${a.source}`);
    if (a.type !== "com.example.ping") {
      return { tag: "ack" };
    }
    const attributes = { ...a, id: `${a.id}-pong`, type: "com.example.pong", extensions: [] };
    return { tag: "reply", val: { attributes, data: event.data } };
  },
};
