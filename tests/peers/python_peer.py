"""A WebSocket peer on Python's `websockets` (major 17, the asyncio API), for tests/ws_peers.rs.

    python3 tests/peers/python_peer.py <persona> [port]

Binds 127.0.0.1 (port 0, an ephemeral port, unless one is given: the tests restart a killed peer
on the same port) and prints `PORT <n>` on stdout first thing. Nothing else goes to stdout;
diagnostics go to stderr only with PEER_DEBUG=1.

Personas:
  echo            echoes every text and binary message; a text `<seq>:<payload>` is answered
                  with `ack:<seq>` instead (at-least-once acknowledgements)
  slow-handshake  accepts TCP, answers the upgrade only after PEER_HANDSHAKE_DELAY_MS (default
                  2000 ms), then echoes
  reject-503      answers the upgrade with HTTP 503
  drop            accepts the upgrade, then destroys the socket without a Close frame after the
                  first message or after PEER_DROP_AFTER_MS (default 300 ms)
  stop-reading    accepts the upgrade, then never reads again: a Close is never answered

`websockets` is found on PYTHONPATH, or in the repository's .peers/python.
"""

import asyncio
import logging
import os
import re
import sys
from http import HTTPStatus

sys.path.append(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".peers", "python")
)

from websockets.asyncio.server import serve  # noqa: E402

PERSONAS = ("echo", "slow-handshake", "reject-503", "drop", "stop-reading")
HANDSHAKE_DELAY = int(os.environ.get("PEER_HANDSHAKE_DELAY_MS", "2000")) / 1000
DROP_AFTER = int(os.environ.get("PEER_DROP_AFTER_MS", "300")) / 1000
DEBUG = os.environ.get("PEER_DEBUG") == "1"
ACK = re.compile(r"^(\d+):")


def debug(persona, *args):
    if DEBUG:
        print(f"[python_peer {persona}]", *args, file=sys.stderr, flush=True)


def main():
    if len(sys.argv) < 2 or sys.argv[1] not in PERSONAS:
        print(f"usage: python3 python_peer.py <{'|'.join(PERSONAS)}> [port]", file=sys.stderr)
        sys.exit(2)
    persona = sys.argv[1]
    port = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    if DEBUG:
        logging.basicConfig(level=logging.DEBUG)
    else:
        # websockets logs failed handshakes and aborted connections: expected here.
        logging.disable(logging.CRITICAL)
    try:
        asyncio.run(run(persona, port))
    except KeyboardInterrupt:
        pass


async def run(persona, port):
    async def process_request(connection, request):
        if persona == "reject-503":
            debug(persona, "rejecting with 503")
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "busy\n")
        if persona == "slow-handshake":
            debug(persona, f"delaying the upgrade by {HANDSHAKE_DELAY} s")
            await asyncio.sleep(HANDSHAKE_DELAY)
        return None

    async def handler(ws):
        debug(persona, "open")
        if persona in ("echo", "slow-handshake"):
            try:
                async for message in ws:
                    if isinstance(message, str):
                        match = ACK.match(message)
                        if match:
                            await ws.send(f"ack:{match.group(1)}")
                            continue
                    await ws.send(message)
            except Exception as error:  # the client went away: nothing to do
                debug(persona, "closed:", error)
        elif persona == "drop":
            try:
                await asyncio.wait_for(ws.recv(), DROP_AFTER)
            except Exception:
                pass
            debug(persona, "dropping the socket without a Close")
            # abort() closes the socket at once: no Close frame.
            ws.transport.abort()
        elif persona == "stop-reading":
            debug(persona, "never reading again")
            ws.transport.pause_reading()
            # Returning would close the connection: wait forever instead.
            await asyncio.Future()

    async with serve(
        handler,
        "127.0.0.1",
        port,
        process_request=process_request,
        ping_interval=None,  # no server pings: a stop-reading peer must stay silent
        open_timeout=30,
        close_timeout=30,
    ) as server:
        chosen = server.sockets[0].getsockname()[1]
        print(f"PORT {chosen}", flush=True)
        await asyncio.Future()


if __name__ == "__main__":
    main()
