// Drives a toolwarden runner with the official MCP TypeScript SDK
// (@modelcontextprotocol/sdk from npm, which speaks the handshake era: 2025-11-25).
// Usage: node tests/mcp_typescript_sdk.mjs SDK_DIR http://127.0.0.1:8080/mcp
// SDK_DIR holds node_modules/@modelcontextprotocol/sdk (.ci/run installs it in
// target/mcp-ts). Prints one JSON object with what the SDK saw; tests/serve_cli.rs
// asserts it.
import { createRequire } from "node:module";
import path from "node:path";

const [sdkDir, url] = process.argv.slice(2);
const require = createRequire(path.join(path.resolve(sdkDir), "package.json"));
const { Client } = require("@modelcontextprotocol/sdk/client/index.js");
const { StreamableHTTPClientTransport } = require("@modelcontextprotocol/sdk/client/streamableHttp.js");

const client = new Client({ name: "toolwarden-test", version: "1.0.0" });
await client.connect(new StreamableHTTPClientTransport(new URL(url)));
const tools = await client.listTools();
const ok = await client.callTool({ name: "moderate-content", arguments: { content: "hello", contentType: "post" } });
const bad = await client.callTool({ name: "moderate-content", arguments: { content: 1 } });

// The slow tool sleeps 3 s; the client gives up after 2.9 s of silence. With
// progress it hears from the server every 2 s and waits for the result...
const progress = [];
const slow = await client.callTool({ name: "slow", arguments: {} }, undefined, {
  timeout: 2900,
  resetTimeoutOnProgress: true,
  onprogress: (p) => progress.push(p),
});
// ...without (no progress token, so one JSON body at the end), it gives up.
let silentError = null;
try {
  await client.callTool({ name: "slow", arguments: {} }, undefined, { timeout: 2900 });
} catch (e) {
  silentError = { code: e.code, message: e.message };
}

console.log(JSON.stringify({
  protocol: client.transport.protocolVersion ?? null,
  server: client.getServerVersion(),
  tools: tools.tools.map((t) => t.name),
  okIsError: ok.isError,
  okResult: ok.structuredContent,
  badIsError: bad.isError,
  badText: bad.content[0].text,
  slowResult: slow.structuredContent,
  progress,
  silentError,
}));
await client.close();
