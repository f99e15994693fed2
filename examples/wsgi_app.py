"""A plain WSGI app for `fastcluster run` (served by wsgiref on a thread pool).

    fastcluster run examples.wsgi_app:app --workers 2 --threads 8 --bind 127.0.0.1:8000
    curl http://127.0.0.1:8000/          # Hello from Cluster! (worker <pid>)
"""

import os


def app(environ, start_response):
    body = f"Hello from Cluster! (worker {os.getpid()})\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]
