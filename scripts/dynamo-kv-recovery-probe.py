#!/usr/bin/env python3
"""Ask a Dynamo 1.6.1 worker's KV-state recovery endpoint (interop spec §8) for its tree dump, the way
a kv-mode Dynamo frontend does at start, and print every frame of the answer. Not used by the tests:
it is how the reply format in tests/fixtures/dynamo/kv_recovery_reply.json was captured, for whoever
implements the recovery query (dynamix serves and asks nothing yet).

  python probe.py HOST PORT PATH WORKER_ID
    HOST:PORT/PATH from the instance record of `worker_kv_query_source_{publisher:x}` in etcd
    (v1/instances/{ns}/{comp}/worker_kv_query_source_*/{id:x}); WORKER_ID the worker's instance id.

Needs msgspec (present in the Dynamo venv the interop tests build).
"""
import socket, struct, json, uuid, threading, sys, msgspec
host, port, path, worker_id = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
lst = socket.socket(); lst.bind(("127.0.0.1", 0)); lst.listen(1)
addr = f"127.0.0.1:{lst.getsockname()[1]}"
rid = str(uuid.uuid4()); subject = str(uuid.uuid4())
frames = []
def read_exact(s, n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c: raise EOFError
        b += c
    return b
def callhome():
    c, _ = lst.accept()
    try:
        while True:
            hl, bl, _ = struct.unpack(">QQQ", read_exact(c, 24))
            h = read_exact(c, hl); b = read_exact(c, bl)
            frames.append((h, b))
            if h == b'"sentinel"': break
    except EOFError:
        frames.append(("EOF", b""))
t = threading.Thread(target=callhome); t.start()
info = json.dumps({"address": addr, "subject": subject, "context": rid, "stream_type": "response"})
control = json.dumps({"id": rid, "request_type": "single_in", "response_type": "many_out", "payload_codec": "msgpack",
    "connection_info": {"transport": "tcp_server", "info": info}}).encode()
body = msgspec.msgpack.encode({"worker_id": worker_id, "dp_rank": 0, "start_event_id": None, "end_event_id": None,
    "supports_tree_dump_failed": True, "kind": "recovery"})
payload = struct.pack(">QQQ", len(control), len(body), 0) + control + body
p = path.encode(); hdr = b"{}"
frame = struct.pack(">H", len(p)) + p + struct.pack(">H", len(hdr)) + hdr + struct.pack(">I", len(payload)) + payload
s = socket.create_connection((host, port)); s.sendall(frame)
n = struct.unpack(">I", read_exact(s, 4))[0]; print("ACK", read_exact(s, n))
t.join(10)
for h, b in frames:
    print("HEADER", h[:200] if isinstance(h, bytes) else h)
    if b:
        try: print("BODY msgpack", json.dumps(msgspec.msgpack.decode(b), default=str)[:3000])
        except Exception as e: print("BODY raw", b[:200], e)
