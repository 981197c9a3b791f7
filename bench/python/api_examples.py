"""docs/api.md's examples, checked with a gRPC client that is not ours (Python grpcio).

    bench/.venv/bin/pip install grpcio grpcio-reflection protobuf
    bench/.venv/bin/python bench/python/api_examples.py --bin $CARGO_TARGET_DIR/debug

Starts a coordinator on loopback with a join token and an operator file, learns the schema only
through its gRPC reflection service (v1alpha, what grpcio's reflection client asks for), then
reads every `grpcurl ... -d '<json>' ... Service/Method` example of docs/api.md: each JSON must
parse into the method's request type (field names and types as the proto3 JSON mapping
says). The examples that read or are refused without side effects are also called: List and
Nodes answer, Get of an unknown job is NOT_FOUND, a viewer's Submit is PERMISSION_DENIED, Health
answers SERVING. Prints one line per example and exits 1 on the first mismatch.
"""

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import time

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
ADMIN = "admin-token-0123456789abcdef"
# Examples called with a viewer's token: those that answer, and those refused (and why).
ANSWERED = {("ringmaster.v1.JobService", "List"), ("ringmaster.v1.JobService", "Nodes"),
            ("grpc.health.v1.Health", "Check")}
REFUSED = {("ringmaster.v1.JobService", "Get"): (grpc.StatusCode.NOT_FOUND, "as no such job runs"),
           ("ringmaster.v1.JobService", "Submit"): (grpc.StatusCode.PERMISSION_DENIED,
                                                    "for a viewer")}
VIEWER = "viewer-token-0123456789abcdef"


class Bearer(grpc.UnaryUnaryClientInterceptor, grpc.StreamStreamClientInterceptor,
             grpc.UnaryStreamClientInterceptor):
    def __init__(self, token):
        self.md = [("authorization", f"Bearer {token}")]

    def _with(self, details):
        return details._replace(metadata=list(details.metadata or []) + self.md)

    def intercept_unary_unary(self, cont, details, req):
        return cont(self._with(details), req)

    def intercept_unary_stream(self, cont, details, req):
        return cont(self._with(details), req)

    def intercept_stream_stream(self, cont, details, reqs):
        return cont(self._with(details), reqs)


def examples(text):
    """(method, json) for every grpcurl command with -d in the markdown."""
    joined = re.sub(r"\\\n\s*", " ", text)
    out = []
    for line in joined.splitlines():
        if "grpcurl" not in line or " -d '" not in line:
            continue
        body = line.split(" -d '", 1)[1].split("'", 1)[0]
        method = re.findall(r"([A-Za-z0-9_.]+)/([A-Za-z0-9_]+)\s*$", line.strip())
        if not method:
            raise SystemExit(f"no method in: {line}")
        out.append((method[0][0], method[0][1], body))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/debug"))
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="api-examples-")
    with open(f"{work}/join", "w") as f:
        f.write("join-token-0123456789abcdef\n")
    with open(f"{work}/operators", "w") as f:
        f.write(f"admin alice {ADMIN}\nviewer bob {VIEWER}\n")
    os.chmod(f"{work}/join", 0o600)
    os.chmod(f"{work}/operators", 0o600)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    coord = subprocess.Popen(
        [f"{args.bin}/coordinator", "--listen", f"127.0.0.1:{port}", "--data-dir", f"{work}/data",
         "--join-token-file", f"{work}/join", "--operator-token-file", f"{work}/operators"],
        stdout=subprocess.DEVNULL, stderr=open(f"{work}/coordinator.log", "w"))
    try:
        raw = grpc.insecure_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(raw).result(timeout=30)
        viewer = grpc.intercept_channel(raw, Bearer(VIEWER))
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(viewer))
        text = open(os.path.join(ROOT, "docs/api.md")).read()
        found = examples(text)
        if len(found) < 16:
            raise SystemExit(f"only {len(found)} examples found in docs/api.md")
        for service, method, body in found:
            svc = pool.FindServiceByName(service)
            m = svc.FindMethodByName(method)
            cls = message_factory.GetMessageClass(m.input_type)
            out_cls = message_factory.GetMessageClass(m.output_type)
            req = json_format.Parse(body, cls())
            note = "parses"
            call = viewer.unary_unary(f"/{service}/{method}",
                                      request_serializer=cls.SerializeToString,
                                      response_deserializer=out_cls.FromString)
            refused = REFUSED.get((service, method))
            if (service, method) in ANSWERED:
                resp = call(req, timeout=10)
                note = f"answered ({type(resp).__name__})"
                if service == "grpc.health.v1.Health" and "SERVING" not in str(resp):
                    raise SystemExit(f"health: {resp}")
            elif refused:
                try:
                    call(req, timeout=10)
                    raise SystemExit(f"{method} answered; expected {refused[0].name}")
                except grpc.RpcError as e:
                    if e.code() != refused[0]:
                        raise SystemExit(f"{method}: {e.code()} {e.details()}")
                    note = f"{refused[0].name}, {refused[1]}"
            print(f"{service}/{method}: {note}")
        print(f"ok: {len(found)} examples")
    finally:
        coord.terminate()
        coord.wait(timeout=10)


if __name__ == "__main__":
    sys.exit(main())
