"""The baseline of stage ``replicate``: a bare gRPC relay over mutual TLS, 3 processes.

``client -> relay -> sink``, each its own process on loopback, with the same
certificates as the agents (roles source, process-server, master-target). One
bidirectional stream per hop carries raw ``bytes`` messages (a generic handler: no
protobuf, no spool, no compression, no encryption beyond TLS). The relay hands the
client's stream straight to its upstream call, so each message is forwarded as it
arrives; the sink answers every message with an 8-byte ack, which the relay passes
back. The client sends ``count`` messages of ``size`` bytes (the number and mean
size of the frames the agents sent) and ends after the last ack.

This is the least any replication over this topology must spend: what the agents
add on top (reading, hashing, zstd, AES-GCM, the spool's fsyncs, applying and
fsyncing at the master target) is what ``replicate``'s ratio measures.

Run by :func:`run_relay`; the processes are ``python -m replication.bench.relay
sink|relay|client ...``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import struct
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

__all__ = ["RelayDeployment", "RelayRun", "run_relay"]

SERVICE = "replication.bench.Relay"
METHOD = f"/{SERVICE}/Stream"
_ACK = struct.Struct("<Q")
_OPTIONS = [
    ("grpc.max_receive_message_length", 80 << 20),
    ("grpc.max_send_message_length", 80 << 20),
]


@dataclass(frozen=True)
class RelayRun:
    """One measured run of the bare relay."""

    wall: float  # client process: start to exit
    stream_seconds: float  # client: first message to last ack
    cpu: dict[str, float]  # role -> CPU seconds during the client's run
    max_rss: dict[str, int]  # role -> peak RSS in bytes
    messages: int
    bytes: int


class RelayDeployment:
    """Sink and relay running; :meth:`run_client` measures one client run, then :meth:`stop`."""

    def __init__(self, work: Path, tls: Path) -> None:
        from ..launch import launch

        self.work, self.tls = work, tls
        me = [sys.executable, "-m", __name__]
        common = ["--listen", "127.0.0.1:0", "--tls-dir", str(tls)]
        self.sink = launch([*me, "sink", *common], work / "sink.log")
        try:
            self.relay = launch(
                [*me, "relay", *common, "--upstream", f"127.0.0.1:{self.sink.port}"],
                work / "relay.log",
            )
        except BaseException:
            self.sink.stop()
            raise
        self._run: tuple | None = None

    def run_client(self, count: int, size: int) -> None:
        """Send ``count`` messages of ``size`` bytes through the relay, to the last ack."""
        from .procs import cpu_seconds, run_measured

        daemons = {"relay": self.relay, "sink": self.sink}
        before = {k: cpu_seconds(d.pid) for k, d in daemons.items()}
        argv = [sys.executable, "-m", __name__, "client", "--tls-dir", str(self.tls)]
        argv += ["--connect", f"127.0.0.1:{self.relay.port}", "--count", str(count)]
        usage, out = run_measured([*argv, "--size", str(size)], self.work / "client.log")
        cpu = {k: cpu_seconds(d.pid) - before[k] for k, d in daemons.items()}
        self._run = (usage, out, cpu)

    def abort(self) -> None:
        """Stop sink and relay after a failure, measuring nothing."""
        self.relay.stop()
        self.sink.stop()

    def stop(self) -> RelayRun:
        """Stop sink and relay; return the measured run (raise if the client failed)."""
        from ..errors import ReplicationError
        from .procs import stop_measured

        stopped = {
            k: stop_measured(d.proc) for k, d in (("relay", self.relay), ("sink", self.sink))
        }
        if self._run is None:
            raise ReplicationError("bench: the relay client did not run")
        usage, out, cpu = self._run
        if usage.returncode != 0:
            raise ReplicationError(f"bench: relay client failed: {out.strip()[-300:]}")
        result = json.loads(out.strip().splitlines()[-1])
        return RelayRun(
            wall=usage.wall,
            stream_seconds=result["seconds"],
            cpu={"client": usage.cpu, **cpu},
            max_rss={"client": usage.max_rss, **{k: u.max_rss for k, u in stopped.items()}},
            messages=result["messages"],
            bytes=result["bytes"],
        )


def run_relay(work: Path, tls: Path, count: int, size: int) -> RelayRun:
    """Start sink and relay, run the client to the last ack, stop them; return the costs."""
    deployment = RelayDeployment(work, tls)
    try:
        deployment.run_client(count, size)
    except BaseException:
        deployment.abort()
        raise
    return deployment.stop()


# -- the three processes -------------------------------------------------------------


def _identity(tls_dir: str, role: str):
    from ..certs import load_identity

    return load_identity(tls_dir, role, "localhost")


def _serve(args: argparse.Namespace, role: str, handler) -> int:
    """Serve ``handler`` as the stream method until SIGTERM; log the listening port."""
    import grpc

    from ..tls import server_credentials

    server = grpc.server(ThreadPoolExecutor(max_workers=4), options=_OPTIONS)
    rpc = grpc.stream_stream_rpc_method_handler(handler)  # no (de)serializer: raw bytes
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, {"Stream": rpc}),)
    )
    port = server.add_secure_port(args.listen, server_credentials(_identity(args.tls_dir, role)))
    server.start()
    print(f"component=bench-{args.role} event=listening port={port}", file=sys.stderr, flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=1).wait()
    return 0


def _sink(args: argparse.Namespace) -> int:
    def stream(requests, context):
        for n, _message in enumerate(requests, 1):
            yield _ACK.pack(n)  # the number of messages received so far

    return _serve(args, "master-target", stream)


def _relay(args: argparse.Namespace) -> int:
    from ..tls import secure_channel

    channel = secure_channel(
        args.upstream, _identity(args.tls_dir, "process-server"), options=_OPTIONS
    )
    upstream = channel.stream_stream(METHOD)

    def stream(requests, context):
        yield from upstream(requests)  # each message goes on as it arrives; acks come back

    return _serve(args, "process-server", stream)


def _client(args: argparse.Namespace) -> int:
    from ..tls import secure_channel

    channel = secure_channel(args.connect, _identity(args.tls_dir, "source"), options=_OPTIONS)
    call = channel.stream_stream(METHOD)
    payload = os.urandom(args.size)
    started = time.perf_counter()
    last = 0
    for ack in call(itertools.repeat(payload, args.count)):
        (last,) = _ACK.unpack(ack)
    seconds = time.perf_counter() - started
    channel.close()
    if last != args.count:
        print(f"error: last ack {last} for {args.count} messages", file=sys.stderr)
        return 1
    record = {"messages": args.count, "bytes": args.count * args.size, "seconds": seconds}
    print(json.dumps(record), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m replication.bench.relay``."""
    p = argparse.ArgumentParser(prog="python -m replication.bench.relay")
    sub = p.add_subparsers(dest="role", required=True)
    for role, fn in (("sink", _sink), ("relay", _relay)):
        s = sub.add_parser(role)
        s.add_argument("--listen", required=True)
        s.add_argument("--tls-dir", required=True)
        s.set_defaults(func=fn)
        if role == "relay":
            s.add_argument("--upstream", required=True)
    c = sub.add_parser("client")
    c.add_argument("--connect", required=True)
    c.add_argument("--tls-dir", required=True)
    c.add_argument("--count", type=int, required=True)
    c.add_argument("--size", type=int, required=True)
    c.set_defaults(func=_client)
    args = p.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
