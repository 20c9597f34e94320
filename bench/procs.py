"""The controller daemon as a real process on loopback, for the bench, the demo and
the integration tests; and how the bench starts and stops every child process.

A child started with :func:`spawn` runs in a session of its own, so its whole process
group can be stopped (:func:`stop_group`: SIGTERM, a short wait, SIGKILL); it watches
its parent and stops when the parent dies, even by SIGKILL; and whatever is still
running at interpreter exit is stopped. :func:`exit_on_signals` turns SIGTERM/SIGHUP
into SystemExit in a bench, so its ``finally`` blocks run."""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import runpy
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from openexample.pki import DevPki

ROOT = Path(__file__).resolve().parent.parent
_LISTEN = re.compile(
    r"listening on [^:]+:(\d+) \((?:mTLS|plaintext)\), metrics on \S+:(\d+)/metrics"
)
_NATIVE = re.compile(r"native listening on ((tcp|unix)://\S+)")


# Processes started by spawn() and not stopped yet: stopped at interpreter exit.
_LIVE: set[subprocess.Popen] = set()


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # the group is gone already
        os.killpg(pgid, sig)


def watch_parent(parent_pid: int, grace_s: float = 5.0, interval_s: float = 0.25) -> None:
    """In a child: once ``parent_pid`` is no longer its parent (it died, even by SIGKILL),
    SIGTERM itself (the clean shutdown path) and exit hard ``grace_s`` later."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(interval_s)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def spawn(module: str, *args: str, **popen: Any) -> subprocess.Popen:
    """``python -m MODULE ARGS`` in a session of its own (its process group is ours to
    stop: :func:`stop_group`), watching this process (it stops when we die, even by
    SIGKILL), and stopped at our exit if nobody stopped it before."""
    cmd = [sys.executable, "-m", "bench.procs", str(os.getpid()), module, *args]
    proc = subprocess.Popen(cmd, start_new_session=True, **popen)
    _LIVE.add(proc)
    return proc


def stop_group(proc: subprocess.Popen, timeout_s: float = 10.0) -> int | None:
    """SIGTERM to ``proc``'s process group, wait up to ``timeout_s`` for ``proc``, then
    SIGKILL to whatever is left of the group. Returns ``proc``'s exit code."""
    if proc.poll() is None:
        _killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout_s)
    _killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)
    _LIVE.discard(proc)
    return proc.returncode


@atexit.register
def _stop_all() -> None:
    for proc in list(_LIVE):
        stop_group(proc, 5.0)


def exit_on_signals(signals: Sequence[int] = (signal.SIGTERM, signal.SIGHUP)) -> None:
    """In the main thread of a bench: these signals raise SystemExit (as Ctrl-C raises
    KeyboardInterrupt), so ``finally`` blocks and atexit stop what it started. Further
    ones are ignored while they do."""

    def handler(signum: int, frame: object) -> None:
        for s in signals:
            signal.signal(s, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    for s in signals:
        signal.signal(s, handler)


class ControllerProcess:
    """``openexample-controller serve`` in a subprocess, its log kept for assertions.

    It listens on gRPC at 127.0.0.1 (``port``, 0 = any) and on the ``native`` addresses
    (e.g. ``tcp://127.0.0.1:0``, ``unix:///tmp/x.sock``); :meth:`address_for` gives the
    bound address of a scheme once started.

    TLS with mTLS, as deployed: certificates come from a development CA (``pki``, by
    default one in ``workdir/pki``); :meth:`agent_tls` gives an agent its settings,
    :meth:`admin_args` an operator's. ``config={"plaintext": True}`` turns TLS off.
    """

    def __init__(
        self,
        workdir: Path,
        config: dict,
        port: int = 0,
        native: Sequence[str] = (),
        *,
        pki: DevPki | None = None,
    ) -> None:
        self.workdir = Path(workdir).resolve()  # the config names files by absolute path
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config = {"journal": str(self.workdir / "journal.sqlite3"), **config}
        self.config.setdefault("metrics_port", 0)
        self.plaintext = bool(self.config.get("plaintext", False))
        self.pki = pki or DevPki(self.workdir / "pki")
        if not self.plaintext:
            ident = f"controller/{self.config.get('controller_id', 'controller-1')}"
            files = self.pki.ensure([ident]).files(ident)
            self.config.setdefault("tls_ca", str(files.ca))
            self.config.setdefault("tls_cert", str(files.cert))
            self.config.setdefault("tls_key", str(files.key))
        self.native = list(native)
        self.native_addresses: dict[str, str] = {}  # scheme -> bound address
        self.config["listen"] = self._listen(port)
        self.config_path = self.workdir / "controller.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config))
        self.port = 0
        self.metrics_port = 0
        self.log: list[str] = []
        self.log_path = self.workdir / "controller.log"
        self.proc: subprocess.Popen | None = None

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def address_for(self, scheme: str) -> str:
        """The bound address of ``grpc``, ``tcp`` or ``unix`` (agents pick by scheme)."""
        return self.address if scheme == "grpc" else self.native_addresses[scheme]

    def agent_tls(self, agent_id: str) -> dict[str, Any]:
        """An agent's settings for this daemon: its certificate (made on first use), or
        ``plaintext`` when the daemon has no TLS."""
        if self.plaintext:
            return {"plaintext": True}
        files = self.pki.issue(f"agent/{agent_id}", overwrite=False)
        return {"tls_ca": str(files.ca), "tls_cert": str(files.cert), "tls_key": str(files.key)}

    def admin_args(self, identity: str = "operator/bench") -> list[str]:
        """``openexample-controller rules|agents`` flags to authenticate as ``identity``."""
        if self.plaintext:
            return ["--plaintext"]
        files = self.pki.issue(identity, overwrite=False)
        return [
            "--tls-ca",
            str(files.ca),
            "--tls-cert",
            str(files.cert),
            "--tls-key",
            str(files.key),
        ]

    def channel_as(self, identity: str = "operator/bench") -> Any:
        """A gRPC channel to the daemon (admin API, health, Connect) as ``identity``."""
        import grpc

        from openexample import grpc_tls

        if self.plaintext:
            return grpc.insecure_channel(self.address)
        files = self.pki.issue(identity, overwrite=False)
        return grpc.secure_channel(self.address, grpc_tls.grpc_channel_credentials(files))

    def _listen(self, port: int) -> str | list[str]:
        grpc = f"127.0.0.1:{port}"
        return [grpc, *self.native] if self.native else grpc

    def start(self, timeout_s: float = 60.0) -> ControllerProcess:
        self.proc = spawn(
            "controller.cli",
            "serve",
            "--config",
            str(self.config_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        ready = threading.Event()
        restart = self.port != 0

        def pump() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            with self.log_path.open("a" if restart else "w") as log:
                for line in self.proc.stdout:
                    log.write(line)
                    log.flush()
                    self.log.append(line.rstrip())
                    n = _NATIVE.search(line)
                    if n:  # logged before the gRPC line
                        self.native_addresses[n[2]] = n[1]
                    m = _LISTEN.search(line)
                    if m:
                        self.port, self.metrics_port = int(m[1]), int(m[2])
                        ready.set()

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + timeout_s
        while not ready.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("controller did not start:\n" + "\n".join(self.log))
        # Restart on the same ports after a kill: keep them from now on.
        self.native = list(self.native_addresses.values())
        self.config["listen"] = self._listen(self.port)
        self.config_path.write_text(yaml.safe_dump(self.config))
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL to its process group: the controller vanishes mid-stream."""
        if self.proc is not None:
            _killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            _LIVE.discard(self.proc)

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM to its process group and wait (the clean shutdown path), then SIGKILL
        to whatever is left of the group."""
        if self.proc is None:
            return None
        return stop_group(self.proc, timeout_s)

    def cli(
        self, command: str, *args: str, identity: str = "operator/bench"
    ) -> subprocess.CompletedProcess:
        """``openexample-controller COMMAND ARGS`` against this daemon, authenticated as
        ``identity`` (its TLS flags go right after COMMAND)."""
        cmd = [sys.executable, "-m", "controller.cli", command, *self.admin_args(identity), *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def mosquitto_path() -> str | None:
    """The Mosquitto broker (Debian package ``mosquitto``), or None."""
    import shutil

    path = Path("/usr/sbin/mosquitto")
    return str(path) if path.exists() else shutil.which("mosquitto")


class BrokerProcess:
    """A Mosquitto MQTT 5 broker on loopback for the east-west bus, as deployed: a TLS
    listener that requires a client certificate from ``pki``'s CA and takes its CN (the
    identity, ``controller/<name>``) as the user name, and an ACL by which a controller
    writes only under ``openexample/v1/cluster/<its identity>/`` and reads all of
    ``openexample/v1/cluster/``. ``plaintext=True``: a plain-text loopback listener
    instead (development only; anyone may write anywhere).

    Started in a session of its own (stopped at our exit if nobody stopped it first);
    :meth:`stop` then :meth:`start` restart it on the same port (the broker "comes
    back"). Its log (every packet) is in ``log_path``; :meth:`denied` lists the
    publishes its ACL refused."""

    def __init__(self, workdir: Path, pki: DevPki | None = None, *, plaintext: bool = False):
        import socket

        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.plaintext = plaintext
        self.pki = None if plaintext else (pki or DevPki(self.workdir / "pki"))
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.log_path = self.workdir / "mosquitto.log"
        self.config_path = self.workdir / "mosquitto.conf"
        self.acl_path = self.workdir / "mosquitto.acl"
        self.acl_path.write_text(
            "# controllers: read the whole bus, write under their own identity only, and\n"
            "# answer a neighbour's work under their own leaf of its answers topic\n"
            "pattern read openexample/v1/cluster/#\n"
            "pattern write openexample/v1/cluster/%u/#\n"
            "pattern write openexample/v1/cluster/+/+/answers/%u\n"
        )
        lines = [
            "per_listener_settings false",
            "persistence false",
            f"log_dest file {self.log_path}",
            "log_type all",
            "connection_messages true",
            # small messages go out at once (Nagle with delayed ACKs holds a second one
            # ~40 ms: what a request/response on the bus must not pay)
            "set_tcp_nodelay true",
            f"listener {self.port} 127.0.0.1",
        ]
        if os.geteuid() == 0:  # else it drops to user mosquitto, who cannot read the keys
            lines.insert(0, "user root")
        if plaintext:
            lines += ["allow_anonymous true"]
        else:
            assert self.pki is not None
            files = self.pki.ensure(["broker/mosquitto"]).files("broker/mosquitto")
            lines += [
                "allow_anonymous false",
                f"acl_file {self.acl_path}",
                f"cafile {files.ca}",
                f"certfile {files.cert}",
                f"keyfile {files.key}",
                "require_certificate true",
                "use_identity_as_username true",
                "tls_version tlsv1.2",
            ]
        self.config_path.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"{'mqtt' if self.plaintext else 'mqtts'}://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 20.0) -> BrokerProcess:
        import socket

        exe = mosquitto_path()
        if exe is None:
            raise RuntimeError("mosquitto is not installed (scripts/system-deps.sh)")
        self.proc = subprocess.Popen(
            [exe, "-c", str(self.config_path)],
            stdout=subprocess.DEVNULL,
            stderr=(self.workdir / "mosquitto.stderr").open("ab"),
            start_new_session=True,
        )
        _LIVE.add(self.proc)
        deadline = time.monotonic() + timeout_s
        while True:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 0.5),
            ):
                return self
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                err = (self.workdir / "mosquitto.stderr").read_text(errors="replace")
                raise RuntimeError(f"mosquitto did not start:\n{err}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc, 5.0)
            self.proc = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def denied(self) -> list[str]:
        """The broker's log lines of publishes its ACL refused."""
        return [line for line in self.log().splitlines() if "Denied PUBLISH" in line]


# --- what is still running: the process tree from /proc (tests, benches) ---

# Helpers multiprocessing starts for the process itself, which end when it does.
_OWN_HELPERS = re.compile(r"from multiprocessing\.(resource_tracker|forkserver) import main")


def process_table() -> dict[int, tuple[int, str, str]]:
    """pid -> (ppid, start time, state), from /proc/PID/stat (threads are not listed)."""
    table = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        table[int(d.name)] = (int(fields[1]), fields[19], fields[0])
    return table


def descendants(root: int) -> dict[tuple[int, str], str]:
    """(pid, start time) -> command line, for every descendant of ``root`` (zombies
    too: :func:`alive` leaves them out)."""
    table = process_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = {}, list(children.get(root, ()))
    while todo:
        pid = todo.pop()
        todo += children.get(pid, ())
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            out[(pid, table[pid][1])] = cmdline.decode(errors="replace").strip()
    return out


def alive(seen: dict[tuple[int, str], str]) -> dict[tuple[int, str], str]:
    """Those of ``seen`` still running (same pid and start time, not a zombie)."""
    table = process_table()
    return {
        (pid, start): cmd
        for (pid, start), cmd in seen.items()
        if pid in table and table[pid][1] == start and table[pid][2] not in "ZX"
    }


def become_subreaper() -> bool:
    """Make this process the one orphans of its descendants are re-parented to (Linux
    ``PR_SET_CHILD_SUBREAPER``), so a grandchild whose parent exited is still ours to
    find; False where that is not possible."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def leftovers(
    root: int, exclude: Sequence[tuple[int, str]] | set = (), grace_s: float = 5.0
) -> dict[tuple[int, str], str]:
    """``root``'s descendants still running after up to ``grace_s`` (those stopping get
    the time to finish), but for ``exclude`` and multiprocessing's own helpers."""
    skip = set(exclude)
    deadline = time.monotonic() + grace_s
    while True:
        found = {
            k: cmd
            for k, cmd in alive(descendants(root)).items()
            if k not in skip and not _OWN_HELPERS.search(cmd)
        }
        if not found or time.monotonic() >= deadline:
            return found
        time.sleep(0.1)


def kill_leftovers(found: dict[tuple[int, str], str]) -> None:
    """SIGKILL each of ``found`` still running (its process group too when it leads one)."""
    for pid, _ in alive(found):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)
            os.kill(pid, signal.SIGKILL)


def _main(argv: list[str]) -> None:
    """``python -m bench.procs PARENT_PID MODULE ARGS``: run MODULE as ``python -m``
    would, under :func:`watch_parent` (what :func:`spawn` starts)."""
    parent, module, *args = argv
    watch_parent(int(parent))
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    _main(sys.argv[1:])


class BusObserver:
    """Reads a cluster bus topic in a thread, with a certificate of its own (as any
    controller may read the bus): when each RT entry's delta was first built
    (``BusMessage.sent_at``, unix seconds). A context manager; ``wait`` blocks until an
    entry is seen, ``times`` is a copy of what was seen so far."""

    def __init__(self, broker: Any, pki: DevPki, name: str) -> None:
        self._broker, self._pki, self._topic = broker, pki, name
        self._made: dict[bytes, float] = {}
        self._cond = threading.Condition()
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> BusObserver:
        import asyncio

        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the bus observer did not subscribe")
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> BusObserver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait(self, fp: bytes, timeout_s: float = 10.0) -> float:
        with self._cond:
            if not self._cond.wait_for(lambda: fp in self._made, timeout_s):
                raise TimeoutError("no delta with that entry seen on the bus")
            return self._made[fp]

    def times(self) -> dict[bytes, float]:
        with self._cond:
            return dict(self._made)

    async def _run(self) -> None:
        import asyncio

        import aiomqtt

        from openexample import tls
        from openexample.v1 import cluster_pb2 as cpb

        ctx = tls.client_context(self._pki.issue("controller/observer", overwrite=False))
        async with aiomqtt.Client(
            "127.0.0.1",
            self._broker.port,
            identifier="observer",
            protocol=aiomqtt.ProtocolVersion.V5,
            tls_context=ctx,
        ) as client:
            await client.subscribe(self._topic, qos=1)
            self._ready.set()
            while not self._stop.is_set():
                try:
                    message = await asyncio.wait_for(anext(client.messages), 0.1)
                except TimeoutError:
                    continue
                msg = cpb.BusMessage.FromString(message.payload)
                with self._cond:
                    for r in msg.delta.rt:
                        self._made.setdefault(r.entry.fingerprint, msg.sent_at)
                    self._cond.notify_all()
