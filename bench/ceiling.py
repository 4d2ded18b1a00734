"""The ceiling: an HTTP server that does nothing but answer every request with a fixed label, on the same asyncio +
httptools core our OIP server runs on. Measured with the same load test, it shows how much of this machine the
client itself takes, and how far every real server is from a server with no work at all.

python -m bench.ceiling PORT
"""

from __future__ import annotations

import asyncio
import sys

import httptools

BODY = b'{"label": "0", "outputs": [{"name": "label", "datatype": "BYTES", "shape": [1], "data": ["0"]}]}'
ANSWER = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(BODY), BODY)


class Nothing(asyncio.Protocol):
    def connection_made(self, transport) -> None:
        self.transport, self.parser = transport, httptools.HttpRequestParser(self)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_message_complete(self) -> None:
        self.transport.write(ANSWER)


async def main(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(Nothing, "127.0.0.1", port, backlog=2048)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.run(main(int(sys.argv[1])))
    except ImportError:
        asyncio.run(main(int(sys.argv[1])))
