"""Baseline for the HTTP rows: a Flask app with one route returning constant JSON, on the service's own server.

Same listener as the service (`http_server.Server` over `http_server.bind`, `serve_forever`), so the
ratio against it shows what the wallet's own work (validation, store, events, logging) costs.
The route reads the request body, because the server only reuses a connection whose body was read.
"""

import argparse
import os
import signal
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flask import Flask, Response, request  # noqa: E402

import http_server  # noqa: E402

BODY = b'{"status":"ok"}'


def create_app():
    app = Flask(__name__)

    @app.route("/api/wallet/deposit", methods=["GET", "POST"])
    def constant():
        request.get_data()
        return Response(BODY, 200, mimetype="application/json")

    return app


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    server = http_server.Server(http_server.bind(args.host, args.port), create_app())
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
    print(f"baseline HTTP listening on {args.host}:{args.port}", flush=True)
    stop.wait()
    server.draining = True
    server.shutdown()
    server.server_close()
    server.drain(1.0)
    os._exit(0)


if __name__ == "__main__":
    main()
