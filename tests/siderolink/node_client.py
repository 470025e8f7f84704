"""What a Talos node does over SideroLink, for the namespace end-to-end test (run with
C{ip netns exec <node> python node_client.py ...}); each command prints one JSON line.

  provision <api host:port> <uuid> <public key>      sidero.link.ProvisionService/Provision
  kmsg <host> <port> <file> [timeout]                 the file's bytes over TCP, then close
  publish <host:port> <events.json> [timeout]         events.EventSinkService/Publish, each
                                                      event {"type": "PhaseEvent", "fields": {...}}
"""

from __future__ import annotations

import json
import socket
import sys

import grpc
from google.protobuf import any_pb2, json_format

from sidero.proto import events_pb2, events_pb2_grpc, machine_pb2
from sidero.proto import provision_pb2 as pb
from sidero.proto import provision_pb2_grpc as pb_grpc


def provision(target: str, uuid: str, key: str) -> dict[str, object]:
    with grpc.insecure_channel(target) as channel:
        response = pb_grpc.ProvisionServiceStub(channel).Provision(pb.ProvisionRequest(
            node_uuid=uuid, node_public_key=key, talos_version="v1.13.0"), timeout=15)
    return json_format.MessageToDict(response, preserving_proto_field_name=True)


def kmsg(host: str, port: int, path: str, timeout: float) -> dict[str, object]:
    data = open(path, "rb").read()
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        s.settimeout(timeout)
        try:
            s.recv(1)  # the receiver closes after EOF
        except OSError:
            pass
    return {"sent": len(data)}


def publish(target: str, path: str, timeout: float) -> dict[str, object]:
    events = json.load(open(path))
    done = 0
    with grpc.insecure_channel(target) as channel:
        stub = events_pb2_grpc.EventSinkServiceStub(channel)
        for i, event in enumerate(events):
            message = getattr(machine_pb2, event["type"])()
            json_format.ParseDict(event.get("fields") or {}, message)
            data = any_pb2.Any()
            data.Pack(message)
            stub.Publish(events_pb2.EventRequest(data=data, id=f"01JEVENT{i:018d}"), timeout=timeout)
            done += 1
    return {"published": done}


def main(argv: list[str]) -> None:
    try:
        if argv[0] == "provision":
            result = provision(argv[1], argv[2], argv[3])
        elif argv[0] == "kmsg":
            result = kmsg(argv[1], int(argv[2]), argv[3], float(argv[4]) if len(argv) > 4 else 10)
        elif argv[0] == "publish":
            result = publish(argv[1], argv[2], float(argv[3]) if len(argv) > 3 else 10)
        else:
            result = {"error": f"unknown command {argv[0]}"}
    except grpc.RpcError as e:
        result = {"error": str(e.details()), "code": e.code().name}  # type: ignore[attr-defined]
    except OSError as e:
        result = {"error": str(e), "errno": e.errno}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
