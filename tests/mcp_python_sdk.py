# Drives `toolwarden serve` with the official MCP Python SDK (pip install mcp).
# Usage: toolwarden serve examples --unsandboxed-dev --listen 127.0.0.1:18081 &
#        python tests/mcp_python_sdk.py
import asyncio
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

async def main():
    async with streamable_http_client("http://127.0.0.1:18081/mcp") as (r, w):
        async with ClientSession(r, w) as s:
            init = await s.initialize()
            print("protocol", init.protocol_version)
            tools = await s.list_tools()
            print([t.name for t in tools.tools], tools.tools[0].annotations)
            res = await s.call_tool("moderate-content", {"content": "hello", "contentType": "post"})
            print("ok:", res.is_error, res.structured_content)
            res = await s.call_tool("moderate-content", {"content": 1})
            print("bad:", res.is_error, res.content[0].text[:120])
asyncio.run(main())
