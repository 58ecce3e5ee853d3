#!/usr/bin/env python3
"""A TCP relay for the TLS specs, a man in the middle on 127.0.0.1: it listens on
a port of its own (printed on its first line), and relays each connection to the
port written in the file TARGET (read at each connection: the pool that listens
there can be made after the relay, and advertise it). After SIGUSR1 it flips one bit of the next bytes it relays in the
given direction ("up": runner to parent, "down": parent to runner), once, and
says so on stdout ("armed", then "flipped up N"). It ends on SIGTERM, or after 10 minutes
whatever happens (a spec that died cannot leave it running for long).

usage: relay.py TARGET DIRECTION
"""
import selectors
import signal
import socket
import sys

target_file = sys.argv[1]
direction = sys.argv[2]
armed = False


def arm(_signo, _frame):
    global armed
    armed = True
    print("armed", flush=True)


signal.signal(signal.SIGUSR1, arm)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
signal.signal(signal.SIGALRM, lambda *_: sys.exit(0))
signal.alarm(600)

listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", 0))
listener.listen(16)
listener.setblocking(False)
print(listener.getsockname()[1], flush=True)

sel = selectors.DefaultSelector()
sel.register(listener, selectors.EVENT_READ, ("accept", None, None))


def close_pair(a, b):
    for s in (a, b):
        try:
            sel.unregister(s)
        except (KeyError, ValueError):
            pass
        s.close()


while True:
    try:
        events = sel.select()
    except InterruptedError:
        continue
    for key, _ in events:
        what, peer, way = key.data
        if what == "accept":
            try:
                runner, _ = listener.accept()
            except BlockingIOError:
                continue
            with open(target_file) as f:
                target = int(f.read().strip())
            parent = socket.create_connection(("127.0.0.1", target))
            sel.register(runner, selectors.EVENT_READ, ("data", parent, "up"))
            sel.register(parent, selectors.EVENT_READ, ("data", runner, "down"))
            continue
        try:
            data = key.fileobj.recv(65536)
        except OSError:
            data = b""
        if not data:
            close_pair(key.fileobj, peer)
            continue
        if armed and way == direction:
            armed = False
            b = bytearray(data)
            b[len(b) // 2] ^= 0x01      # inside a record, past its header
            data = bytes(b)
            print("flipped", way, len(data), flush=True)
        try:
            peer.sendall(data)
        except OSError:
            close_pair(key.fileobj, peer)
