#!/usr/bin/env python3
"""A fake Docker engine (named a fake: an engine older or newer than Debian's cannot
run here) for the API version negotiation specs in spec/13-docker_spec.lua. Listens
on a unix socket and answers GET /version with the versions it is given; every other
request is written to stdout (method and path) and refused with a 500 whose message
names the fake, so a boot stops there.
  fake_engine.py SOCKET API_VERSION MIN_API_VERSION
"""
import http.server, json, os, socketserver, sys

sock, api, min_api = sys.argv[1], sys.argv[2], sys.argv[3]

class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def reply(self, code, obj):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def handle_any(self):
        n = int(self.headers.get("Content-Length", "0"))
        if n: self.rfile.read(n)
        if self.path == "/version":
            return self.reply(200, {"ApiVersion": api, "MinAPIVersion": min_api,
                                    "Version": "fake"})
        print(self.command, self.path, flush=True)
        if self.command == "GET" and "/containers/json" in self.path:
            return self.reply(200, [])
        self.reply(500, {"message": "fake engine: no containers here"})
    do_GET = do_POST = do_DELETE = handle_any

class Unix(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    def get_request(self):
        conn, _ = self.socket.accept()
        return conn, ("unix", 0)

if os.path.exists(sock): os.unlink(sock)
srv = Unix(sock, H)
print("ready", flush=True)
srv.serve_forever()
