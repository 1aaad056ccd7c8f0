// A taskmux client written with grpc-js, loading protos/ directly: proof that the
// public API works from another gRPC implementation.
//
//   node client.mjs HOST:PORT                        plaintext, no key: the API tour
//   node client.mjs HOST:PORT --secure PKI_DIR       mutual TLS (ca.pem, client.pem,
//        client.key in PKI_DIR), the key in TASKMUX_API_KEY, a wrong one in
//        TASKMUX_BAD_KEY and a rate-limited tenant's in TASKMUX_LIMITED_KEY
//
// Prints one JSON object with what each call returned (or its status code).
import { readFileSync } from "node:fs";
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
const [target, mode, pkiDir] = process.argv.slice(2);
const secure = mode === "--secure";
const credentials = secure
  ? grpc.credentials.createSsl(
      readFileSync(path.join(pkiDir, "ca.pem")),
      readFileSync(path.join(pkiDir, "client.key")),
      readFileSync(path.join(pkiDir, "client.pem")),
    )
  : grpc.credentials.createInsecure();
const client = new TaskMux(target, credentials);

function withKey(key) {
  const metadata = new grpc.Metadata();
  if (key) metadata.set("authorization", `Bearer ${key}`);
  return metadata;
}

// The response, or the status code with the retry hint a RESOURCE_EXHAUSTED carries.
function call(method, request, key = process.env.TASKMUX_API_KEY) {
  const deadline = new Date(Date.now() + 30000);
  return new Promise((resolve) => {
    client[method](request, withKey(key), { deadline }, (err, response) => {
      if (!err) return resolve(response);
      const hint = err.metadata?.get("retry-after-ms")[0];
      resolve({ code: grpc.status[err.code], details: err.details, retry_after_ms: hint });
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
if (secure) {
  out.no_key = await call("Embed", { texts: ["x"] }, "");
  out.bad_key = await call("Embed", { texts: ["x"] }, process.env.TASKMUX_BAD_KEY);
  const limited = process.env.TASKMUX_LIMITED_KEY;
  out.limited_first = await call("Embed", { texts: ["first"] }, limited);
  out.limited_second = await call("Embed", { texts: ["second"] }, limited);
}
client.close();
console.log(JSON.stringify(out));
