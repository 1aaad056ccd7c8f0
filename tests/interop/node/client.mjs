// A taskmux client written with grpc-js, loading protos/ directly: proof that the
// public API works from another gRPC implementation. Usage: node client.mjs HOST:PORT
// Prints one JSON object with what each call returned (or its status code).
import { fileURLToPath } from "node:url";
import path from "node:path";
import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";

const here = path.dirname(fileURLToPath(import.meta.url));
const protoRoot = path.resolve(here, "../../../protos");
const definition = protoLoader.loadSync("taskmux/v1/taskmux.proto", {
  includeDirs: [protoRoot],
  keepCase: true,
  enums: String,
  longs: Number,
  defaults: true,
});
const { TaskMux } = grpc.loadPackageDefinition(definition).taskmux.v1;
const client = new TaskMux(process.argv[2], grpc.credentials.createInsecure());

function call(method, request) {
  const deadline = new Date(Date.now() + 30000);
  return new Promise((resolve) => {
    client[method](request, { deadline }, (err, response) => {
      resolve(err ? { code: grpc.status[err.code], details: err.details } : response);
    });
  });
}

const out = {
  tasks: await call("ListTasks", {}),
  embed: await call("Embed", { texts: ["hello from node", "héllo 東京"] }),
  classify: await call("Classify", { head: "sentiment", texts: ["I loved it"], top_k: 2 }),
  empty: await call("Embed", { texts: [] }),
  unknown: await call("Classify", { head: "no-such-head", texts: ["x"] }),
};
client.close();
console.log(JSON.stringify(out));
