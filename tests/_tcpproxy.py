"""A TCP forwarder for the test cluster: LISTEN_HOST:PORT -> TARGET_HOST:PORT.

RabbitMQ and Redis listen on 127.0.0.1 only, which a network namespace cannot
reach. The test cluster runs this on the host side of its bridge, so that the
nodes reach the servers over their own network, as remote boards would.

    python _tcpproxy.py 10.231.0.1:5672=127.0.0.1:5672 10.231.0.1:6379=127.0.0.1:6379

It prints ``ready`` once every port listens, and exits when its parent does
(a test run that dies leaves no forwarder behind).
"""

import asyncio
import os
import sys


async def _pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        try:
            writer.close()
        except Exception:
            pass


async def _forward(target, client_reader, client_writer):
    host, port = target
    try:
        server_reader, server_writer = await asyncio.open_connection(host, port)
    except OSError:
        client_writer.close()
        return
    await asyncio.gather(
        _pipe(client_reader, server_writer), _pipe(server_reader, client_writer)
    )


def _address(text):
    host, _, port = text.rpartition(":")
    return host, int(port)


async def main(mappings):
    parent = os.getppid()
    servers = []
    for mapping in mappings:
        listen, _, target = mapping.partition("=")
        host, port = _address(listen)
        to = _address(target)
        servers.append(
            await asyncio.start_server(lambda r, w, t=to: _forward(t, r, w), host, port)
        )
    print("ready", flush=True)
    while os.getppid() == parent:
        await asyncio.sleep(0.5)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
