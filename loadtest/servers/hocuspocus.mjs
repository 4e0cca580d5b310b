// Starts @hocuspocus/server as installed from npm, with its defaults and no extensions (documents
// live in memory), on 127.0.0.1:$PORT. collab-bench measures our server against it.
import { Server } from "@hocuspocus/server";

const port = Number(process.env.PORT ?? 1234);
const server = new Server({ port, address: "127.0.0.1", quiet: true, stopOnSignals: true });
await server.listen();
console.log(`hocuspocus listening on 127.0.0.1:${port}`);
