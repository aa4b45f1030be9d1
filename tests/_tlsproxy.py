"""A TLS-terminating proxy for tests: TLS on 127.0.0.1:<port> -> a plain TCP server.

Redis and RabbitMQ run here without TLS; this puts TLS in front of one, so
that a client and nodes given an ``rediss://`` or ``amqps://`` URL really
speak TLS, verify the certificate, and work through it.
"""

import asyncio
import contextlib
import ssl
import subprocess
import threading
from pathlib import Path


def self_signed_certificate(folder):
    """A certificate for 127.0.0.1 and its key (``openssl`` CLI), as paths."""
    cert, key = Path(folder, "cert.pem"), Path(folder, "key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


class TLSProxy:
    """Accepts TLS on a free port of 127.0.0.1 and forwards to ``target_port``.

    ``handshakes`` counts the TLS connections it accepted (a failed handshake,
    from a client speaking plain TCP or one that does not trust the
    certificate, never counts).
    """

    def __init__(self, target_port, certfile, keyfile):
        self.target_port = target_port
        self.handshakes = 0
        self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._context.load_cert_chain(certfile, keyfile)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tls-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the TLS proxy did not start")

    def _run(self):
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._forward, "127.0.0.1", 0, ssl=self._context)
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        tasks = asyncio.all_tasks(self._loop)
        for task in tasks:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        self._server.close()
        self._loop.run_until_complete(self._server.wait_closed())
        self._loop.close()

    async def _forward(self, reader, writer):
        self.handshakes += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        except asyncio.CancelledError:  # the proxy closes
            for w in (writer, up_writer):
                w.close()

    def close(self):
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        assert not self._thread.is_alive(), "the TLS proxy did not stop"

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


async def _pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError, ssl.SSLError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()
