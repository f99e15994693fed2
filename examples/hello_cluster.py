"""Node's cluster example, ported line for line.

    python examples/hello_cluster.py        # then: curl http://127.0.0.1:8000/

The primary forks one worker per CPU and logs their deaths; each worker
serves "Hello from Cluster!" over HTTP on port 8000 (PORT overrides), all of
them on the same port: the primary accepts and hands connections to them.
"""

import os
from http.server import BaseHTTPRequestHandler, HTTPServer

import fastcluster as cluster

num_cpus = os.cpu_count() or 1
port = int(os.environ.get("PORT", "8000"))


class Hello(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "20")
        self.send_header("X-Worker-Pid", str(os.getpid()))
        self.end_headers()
        self.wfile.write(b"Hello from Cluster!\n")

    def log_message(self, format: str, *args: object) -> None:
        pass


if cluster.is_primary:
    print(f"Primary {os.getpid()} is running", flush=True)

    # Fork workers.
    for _ in range(num_cpus):
        cluster.fork()

    cluster.on("exit", lambda worker, code, signal: print(f"Worker {worker.pid} died", flush=True))
    cluster.run()  # in Python the primary's loop is explicit
else:
    # Workers can share any TCP connection. In this case it is an HTTP server.
    server = HTTPServer(("127.0.0.1", port), Hello, bind_and_activate=False)
    cluster.listen_server(server)

    print(f"Worker {os.getpid()} started", flush=True)
    server.serve_forever()
