// socket.io 4 relay for the benchmark suite (bench/README.md): every client joins the room
// "u:<id>" (id from the handshake query or auth) and an event "c" {to, p} is relayed to
// room "u:<to>" as "c" {f, p} through @socket.io/redis-streams-adapter, so it reaches the
// recipient on whichever instance holds it.  PORT and REDIS_URL come from the environment.
"use strict";

const { createServer } = require("node:http");
const { Server } = require("socket.io");
const { createClient } = require("redis");
const { createAdapter } = require("@socket.io/redis-streams-adapter");

async function main() {
  const port = Number(process.env.PORT || 3000);
  const redisClient = createClient({ url: process.env.REDIS_URL || "redis://127.0.0.1:6379" });
  redisClient.on("error", (err) => console.error("redis:", err.message));
  await redisClient.connect();

  const httpServer = createServer();
  const io = new Server(httpServer, {
    adapter: createAdapter(redisClient),
    transports: ["websocket"],
    serveClient: false,
  });

  io.on("connection", (socket) => {
    const id = String(socket.handshake.query.id || (socket.handshake.auth || {}).id || "");
    if (!id) {
      socket.disconnect(true);
      return;
    }
    socket.data.id = id;
    socket.join("u:" + id);
    socket.on("c", (msg) => {
      if (msg && typeof msg.to === "string") {
        io.to("u:" + msg.to).emit("c", { f: id, p: msg.p });
      }
    });
  });

  httpServer.listen(port, "127.0.0.1", () => console.log(`socket.io listening on ${port}`));
  const stop = () => io.close(() => process.exit(0));
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
