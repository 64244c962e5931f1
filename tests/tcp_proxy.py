"""A TCP proxy for the failure tests: it stands between the app and PostgreSQL, and a test can cut the line or
turn it into a black hole, then restore it, without touching the database server that other tests share."""

import asyncio
import contextlib
import socket
import threading

CONNECT_TIMEOUT = 5  # to the real server, which is on this machine: a slow connect is a broken test setup


def reserve(port: int = 0) -> socket.socket:
    """A socket bound to 127.0.0.1:``port`` that does not listen: connections to it are refused, and no other
    program can take the port (bind(0) never hands out a bound port) until it listens again."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the connections just closed linger in TIME_WAIT
    sock.bind(("127.0.0.1", port))
    return sock


class Link:
    """One client connection and, unless it arrived in a black hole, its connection to the server."""

    def __init__(self, client: asyncio.StreamWriter, held: bool):
        self.client = client
        self.server: asyncio.StreamWriter | None = None
        self.held = held  # in a black hole: bytes from either side go nowhere
        self.closed = False

    def close(self) -> None:
        self.closed = True
        for writer in (self.client, self.server):
            if writer is not None:
                writer.transport.abort()


class TcpProxy:
    """Forwards 127.0.0.1:``port`` to ``host:port``, in one background thread running an asyncio loop.

    - ``cut()``: the server is gone. Every connection is closed and new ones are refused.
    - ``blackhole()``: the server hangs. Connections stay open, new ones are accepted, and nothing is forwarded
      either way. This machine's TCP stack still acknowledges every byte, so TCP keepalives and tcp_user_timeout
      see a live peer, as they do with a hung server or a pooler whose server is gone: only deadlines of the
      client's own end its waits. (A network that drops packets needs root to make.)
    - ``restore()``: forward again on the same port; connections held in a black hole are closed first, as the
      client would have given up on them.

    Each call returns once the change is in effect. Use it as a context manager, so that it always stops."""

    def __init__(self, host: str, port: int):
        self.target = (host, port)
        self.mode = "stopped"
        self._links: set[Link] = set()
        self._tasks: set[asyncio.Task] = set()
        self._server: asyncio.Server | None = None
        self._reserved = reserve()
        self.port = self._reserved.getsockname()[1]
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"tcp-proxy-{self.port}", daemon=True)
        self._thread.start()
        try:
            self.restore()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "TcpProxy":
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    @property
    def live_connections(self) -> int:
        return self._run(self._count())

    def cut(self) -> None:
        self._run(self._cut())

    def blackhole(self) -> None:
        self._run(self._blackhole())

    def restore(self) -> None:
        self._run(self._restore())

    def close(self) -> None:
        """Stop for good: close every connection and the port, and end the thread."""
        if not self._thread.is_alive():
            return
        with contextlib.suppress(Exception):
            self._run(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=30)

    async def _count(self) -> int:
        return len(self._links)

    async def _cut(self) -> None:
        self._stop_listening()
        self._close_links()
        self.mode = "cut"

    async def _blackhole(self) -> None:
        for link in self._links:
            link.held = True
        if self._server is None:
            await self._listen()
        self.mode = "blackhole"

    async def _restore(self) -> None:
        self._close_links(held_only=True)
        if self._server is None:
            await self._listen()
        self.mode = "forwarding"

    async def _shutdown(self) -> None:
        self._stop_listening()
        self._close_links()
        self._reserved.close()
        # Closed connections end their tasks within a turn of the loop. Cancelling them instead would make
        # asyncio 3.11 log an error for each.
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        self.mode = "stopped"

    async def _listen(self) -> None:
        self._reserved.listen(128)
        self._server = await asyncio.start_server(self._serve, sock=self._reserved)

    def _stop_listening(self) -> None:
        if self._server is not None:
            self._server.close()  # closes the listening socket at once: from now on connections are refused
            self._server = None
            self._reserved = reserve(self.port)

    def _close_links(self, held_only: bool = False) -> None:
        for link in list(self._links):
            if link.held or not held_only:
                link.close()
                self._links.discard(link)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._tasks.add(asyncio.current_task())
        link = Link(writer, held=self.mode == "blackhole")
        self._links.add(link)
        try:
            if link.held:
                await self._pump(link, reader, None)
                return
            try:
                server_reader, link.server = await asyncio.wait_for(
                    asyncio.open_connection(*self.target), CONNECT_TIMEOUT
                )
            except (OSError, TimeoutError):
                return
            if link.closed:  # cut while connecting
                return
            await asyncio.gather(self._pump(link, reader, link.server), self._pump(link, server_reader, writer))
        finally:
            link.close()
            self._links.discard(link)
            self._tasks.discard(asyncio.current_task())

    async def _pump(self, link: Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter | None) -> None:
        """Copy one direction until either side hangs up; in a black hole, read and drop."""
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                if link.held or writer is None:
                    continue
                writer.write(data)
                await writer.drain()
        link.close()  # PostgreSQL's protocol has no half-closed connections: one side gone ends both
