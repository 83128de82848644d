# A wasmesh subscriber written in Python (the `subscriber` world of wit/plugin.wit), made a
# component by componentize-py. It logs each event through the host's `log` import and answers
# an event of type `com.example.ping` with a reply of type `com.example.pong` carrying the same
# data; every other event is acknowledged. Built with `--stub-wasi`, it imports nothing but
# wasmesh's own interfaces: write through `log`, not `print` (stdout is a stub that traps).
import dataclasses

from wit_world import exports
from wit_world.imports import config, log, types


class Handler(exports.Handler):
    def handle(self, event: types.Event) -> types.Disposition:
        a = event.attributes
        greeting = config.get("greeting") or "hello"
        log.log(types.Level.INFO, f"{greeting}: {a.type} from {a.source}")
        if a.type != "com.example.ping":
            return types.Disposition_Ack()
        pong = dataclasses.replace(a, id=f"{a.id}-pong", type="com.example.pong", extensions=[])
        return types.Disposition_Reply(types.Event(pong, event.data))
