"""Minimal RFC 6455 client (text frames, close, ping/pong), standard library only."""
import base64
import json
import os
import socket
import struct


class Closed(Exception):
    def __init__(self, code=None, reason=""):
        super().__init__(f"closed {code} {reason}")
        self.code = code
        self.reason = reason


class HandshakeError(Exception):
    pass


class WS:
    def __init__(self, host, port, path, timeout=3.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        key = base64.b64encode(os.urandom(16)).decode()
        req = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
        self.sock.sendall(req.encode())
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            d = self.sock.recv(4096)
            if not d:
                raise HandshakeError("eof in handshake")
            self.buf += d
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        status = head.split(b"\r\n", 1)[0]
        if b" 101 " not in status + b" ":
            raise HandshakeError(status.decode(errors="replace"))
        self.closed = None  # (code, reason) once a close frame arrived

    def _send_frame(self, opcode, payload):
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            hdr = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 65536:
            hdr = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            hdr = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        masked = bytes(b ^ mask[i & 3] for i, b in enumerate(payload))
        self.sock.sendall(hdr + mask + masked)

    def send_json(self, obj):
        self._send_frame(0x1, json.dumps(obj).encode())

    def send_close(self, code=1000):
        try:
            self._send_frame(0x8, struct.pack("!H", code))
        except OSError:
            pass

    def _frame(self):
        """One complete frame from the buffer, or None."""
        b = self.buf
        if len(b) < 2:
            return None
        op = b[0] & 0x0F
        n = b[1] & 0x7F
        i = 2
        if n == 126:
            if len(b) < 4:
                return None
            n = struct.unpack("!H", b[2:4])[0]
            i = 4
        elif n == 127:
            if len(b) < 10:
                return None
            n = struct.unpack("!Q", b[2:10])[0]
            i = 10
        if b[1] & 0x80:
            i += 4  # server must not mask; tolerate
        if len(b) < i + n:
            return None
        payload = b[i:i + n]
        self.buf = b[i + n:]
        return b[0] & 0x80, op, payload

    def recv(self, timeout):
        """Next text message as dict, or None on timeout. Raises Closed on close/EOF."""
        self.sock.settimeout(timeout)
        frag = b""
        while True:
            f = self._frame()
            if f is None:
                try:
                    d = self.sock.recv(65536)
                except socket.timeout:
                    return None
                except OSError as e:
                    raise Closed(None, f"error {e}")
                if not d:
                    raise Closed(None, "eof")
                self.buf += d
                continue
            fin, op, payload = f
            if op == 0x9:
                try:
                    self._send_frame(0xA, payload)
                except OSError:
                    pass
            elif op == 0xA:
                pass
            elif op == 0x8:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                self.closed = (code, payload[2:].decode(errors="replace"))
                raise Closed(code, self.closed[1])
            elif op in (0x1, 0x0):
                frag += payload
                if fin:
                    return json.loads(frag.decode())
            else:
                raise Closed(None, f"unexpected opcode {op}")

    def close_sock(self):
        try:
            self.sock.close()
        except OSError:
            pass
