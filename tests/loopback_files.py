"""A loopback HTTP file server for the fetch tests: serves bytes by path, counts requests, can stall.

>>> with FileServer({"/a/b.txt": b"hi"}) as server:   # doctest: +SKIP
...     urllib.request.urlopen(server.url + "/a/b.txt").read()
"""

from __future__ import annotations

import http.server
import threading
import time


class FileServer:
    """Serve ``files`` (path -> bytes) on 127.0.0.1; paths in ``stall`` answer only after ``stall_s`` seconds."""

    def __init__(self, files: dict[str, bytes] | None = None, *, stall: tuple[str, ...] = (), stall_s: float = 30.0):
        self.files = dict(files or {})
        self.stall, self.stall_s = set(stall), stall_s
        self.requests: list[str] = []
        self._stop = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                outer.requests.append(self.path)
                if self.path in outer.stall:
                    outer._stop.wait(outer.stall_s)  # ends at once when the server is closed
                    return
                body = outer.files.get(self.path)
                if body is None:
                    self.send_error(404, "not found")
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # quiet
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> FileServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5)


def closed_port_url() -> str:
    """A loopback URL on which nothing listens (a port just released): every request is refused."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    time.sleep(0.01)
    return f"http://127.0.0.1:{port}"
