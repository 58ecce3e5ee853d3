#!/usr/bin/env python3
"""A small HTTP server for spec/12-http_spec.lua (a test peer, not a fake of any
service): listens on 127.0.0.1 (port printed on stdout) or on a unix socket.
  GET  /hello   200 "hello", header X-Test: yes
  POST /echo    200, the body back, the method in X-Method
  PUT  /echo    the same
  GET  /slow    answers after 3 s
  GET  /stream  three chunks, 100 ms apart
  else          404
"""
import http.server, os, socketserver, sys, time

class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def reply(self, code, body, extra=()):
        self.send_response(code)
        for k, v in extra: self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        if self.path == "/hello": return self.reply(200, b"hello", [("X-Test", "yes")])
        if self.path == "/slow":
            time.sleep(3)
            return self.reply(200, b"late")
        if self.path == "/stream":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(3):
                data = ("part%d" % i).encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
                time.sleep(0.1)
            self.wfile.write(b"0\r\n\r\n")
            return
        self.reply(404, b"no such thing")
    def do_POST(self):
        n = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(n)
        self.reply(200, body, [("X-Method", self.command)])
    do_PUT = do_POST

class TCP(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    request_queue_size = 128

class Unix(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    request_queue_size = 128      # a full backlog refuses unix connections at once
    def get_request(self):
        conn, _ = self.socket.accept()
        return conn, ("unix", 0)

if len(sys.argv) > 1 and sys.argv[1] != "0":
    path = sys.argv[1]
    if os.path.exists(path): os.unlink(path)
    srv = Unix(path, H)
    print(path, flush=True)
else:
    srv = TCP(("127.0.0.1", 0), H)
    print(srv.server_address[1], flush=True)
srv.serve_forever()
