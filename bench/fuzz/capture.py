"""Capture real clients' requests as seeds: ``python -m bench.fuzz.capture`` (root).

In a private network namespace (two ends of a veth pair, for broadcast DHCP), listeners record
the first datagram or bytes each client sends: udhcpc (DHCP; perfdhcp's relay mode
sends nothing on a veth here), tftp-hpa, curl and
atftp (TFTP), curl (HTTP), util-linux logger (syslog over UDP and TCP).  The files go to
C{corpus/<target>/real-<client>}; they are committed, so this only needs running again to add
a client.  The namespace and every process are removed at the end.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.fuzz.targets import join_frames

HERE = Path(__file__).resolve().parent
NS = f"fuzzcap-{os.getpid()}"

LISTENER = r"""
import socket, sys, select, time
out = sys.argv[1]
udp = {}
for port in (67, 69, 514):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    s.bind(("0.0.0.0", port))
    udp[s] = port
tcp = {}
for port in (8081, 601):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(8)
    tcp[s] = port
n = 0
print("ready", flush=True)
while True:
    r, _, _ = select.select(list(udp) + list(tcp), [], [], 30)
    if not r:
        break
    for s in r:
        n += 1
        if s in udp:
            data, addr = s.recvfrom(65535)
            open(f"{out}/udp{udp[s]}-{n}", "wb").write(data)
            if udp[s] == 69:  # make the client give up at once
                s.sendto(b"\x00\x05\x00\x01not here\x00", addr)
        else:
            c, _ = s.accept()
            c.settimeout(1)
            data = b""
            try:
                while len(data) < 65536:
                    chunk = c.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                    if tcp[s] == 8081 and b"\r\n\r\n" in data:
                        break
            except OSError:
                pass
            if tcp[s] == 8081:
                c.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            c.close()
            open(f"{out}/tcp{tcp[s]}-{n}", "wb").write(data)
"""

UUID = "4c4c4544-0032-3410-8058-b4c04f4d4e31"


def sh(*argv: str, timeout: float = 20) -> None:
    subprocess.run(["ip", "netns", "exec", NS, *argv], timeout=timeout, check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


CLIENTS: list[tuple[str, str, list[str]]] = [
    ("dhcp", "udhcpc-pxe", ["udhcpc", "-i", "va", "-n", "-q", "-t", "1", "-T", "1", "-f",
                            "-V", "PXEClient:Arch:00000:UNDI:002001", "-x", "93:0000",
                            "-x", "97:00" + UUID.replace("-", "")]),
    ("dhcp", "udhcpc-plain", ["udhcpc", "-i", "va", "-n", "-q", "-t", "1", "-T", "1", "-f"]),
    ("tftp", "tftp-hpa", ["tftp", "10.213.9.2", "-m", "binary", "-c", "get", "undionly.kpxe",
                          "/dev/null"]),
    ("tftp", "curl-ipxe-options", ["curl", "-s", "--max-time", "2", "--tftp-blksize", "1432",
                                   "-o", "/dev/null", "tftp://10.213.9.2/snp.efi"]),
    ("tftp", "atftp", ["atftp", "--option", "blksize 1428", "--option", "tsize 0",
                       "--option", "windowsize 8", "--option", "timeout 2", "-g", "-r",
                       "snp-arm64.efi", "-l", "/dev/null", "10.213.9.2"]),
    ("http", "curl-ipxe", ["curl", "-s", "--max-time", "2", "-A", "iPXE/1.21.1+ (g8e8a5)",
                           f"http://10.213.9.2:8081/ipxe?uuid={UUID}&mac=52-54-00-12-34-56"
                           "&domain=&hostname=&serial=59QCJX2&arch=x86_64"]),
    ("http", "curl-configdata", ["curl", "-s", "--max-time", "2",
                                 "http://10.213.9.2:8081/configdata?uuid=0000-1111-2222"]),
    ("http", "curl-bootipxe-head", ["curl", "-s", "--max-time", "2", "-I", "-A", "iPXE/1.0.0",
                                    "http://10.213.9.2:8081/boot.ipxe"]),
    ("http", "curl-range", ["curl", "-s", "--max-time", "2", "-r", "0-99",
                            "-H", "If-Modified-Since: Tue, 29 Jul 2025 10:13:32 GMT",
                            "http://10.213.9.2:8081/env/default/vmlinuz"]),
    ("http", "curl-tftp-asset", ["curl", "-s", "--max-time", "2", "-A", "iPXE/1.21.1",
                                 "http://10.213.9.2:8081/tftp/undionly.kpxe"]),
    ("syslog", "logger-rfc5424-udp", ["logger", "--rfc5424", "-d", "-n", "10.213.9.2", "-P", "514",
                                      "--sd-id", "meta@32473", "--sd-param", 'seq="1"',
                                      "-t", "bmc", "power on"]),
    ("syslog", "logger-rfc3164-udp", ["logger", "--rfc3164", "-d", "-n", "10.213.9.2", "-P", "514",
                                      "-t", "ipxe", "-i", "DHCP net0 ok"]),
    ("syslog", "logger-tcp-octet", ["logger", "--rfc5424", "-T", "--octet-count", "-n",
                                    "10.213.9.2", "-P", "601", "kernel: link up"]),
]


def main() -> int:
    if os.geteuid() != 0:
        sys.exit("needs root (a network namespace)")
    work = Path(tempfile.mkdtemp(prefix="fuzzcap-"))
    subprocess.run(["ip", "netns", "add", NS], check=True)
    listener = None
    try:
        sh("ip", "link", "set", "lo", "up")
        sh("ip", "link", "add", "va", "type", "veth", "peer", "name", "vb")
        sh("ip", "addr", "add", "10.213.9.1/24", "dev", "va")
        sh("ip", "addr", "add", "10.213.9.2/24", "dev", "vb")
        sh("ip", "link", "set", "va", "up")
        sh("ip", "link", "set", "vb", "up")
        script = work / "listen.py"
        script.write_text(LISTENER)
        listener = subprocess.Popen(["ip", "netns", "exec", NS, sys.executable, str(script),
                                     str(work)], stdout=subprocess.PIPE, text=True)
        assert listener.stdout is not None
        listener.stdout.readline()
        for target, name, argv in CLIENTS:
            if shutil.which(argv[0]) is None:
                print(f"skipping {name}: {argv[0]} not installed", file=sys.stderr)
                continue
            before = set(work.iterdir())
            sh(*argv, timeout=15)
            got = sorted(set(work.iterdir()) - before - {script}, key=lambda p: p.stat().st_mtime)
            if not got:
                print(f"{name}: nothing captured", file=sys.stderr)
                continue
            data = got[0].read_bytes()
            dest = HERE / "corpus" / target
            dest.mkdir(parents=True, exist_ok=True)
            if target == "syslog" and got[0].name.startswith("tcp"):
                data = join_frames([data])
            (dest / f"real-{name}").write_bytes(data)
            print(f"{name}: {len(data)} bytes -> corpus/{target}/real-{name}", file=sys.stderr)
    finally:
        if listener is not None:
            listener.kill()
            listener.wait()
        subprocess.run(["ip", "netns", "del", NS], check=False)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
