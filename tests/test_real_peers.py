"""Other people's implementations: QEMU as front-end, qemu-storage-daemon as back-end.

Debian's QEMU 7.2 knows no SHMEM; these check the base handshake both ways.
The test command installs the packages; without them these tests fail under
CI=true (a missing install step must show) and are skipped elsewhere.

Nothing here sleeps to let something happen: each test waits for a peer to say
so, through QEMU's QMP or a daemon's control socket (both QMP, spoken by
`Monitor`).
"""

from __future__ import annotations

import json
import os
import re
import socket
from dataclasses import dataclass
from typing import Any

import pytest

from backend_sim.presets import DEFAULT, PRESETS, Preset
from shmemctl.events import TRACE

from .conftest import Proc, need, wait_until

pytestmark = pytest.mark.qemu


class MonitorClosed(AssertionError):
    """The process behind the monitor went away (QEMU aborted, a daemon died)."""


class Monitor:
    """A QMP monitor, one request at a time: QEMU's own, or the control socket of a
    shmemctl daemon. `events` collects the events that arrive; `execute`
    returns once the process has run the command, so it doubles as a fence: `events`
    then holds every event the process published to us before it ran it."""

    def __init__(self, path: str, timeout: float = 30.0, proc: Proc | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.path = path
        self.proc = proc
        self._file = self.sock.makefile("rb")
        self._id = 0
        self.events: list[dict[str, Any]] = []
        self.greeting = self._read()
        assert "QMP" in self.greeting, self.greeting
        self.execute("qmp_capabilities")

    @classmethod
    def of(cls, proc: Proc, path: str, timeout: float = 30.0) -> Monitor:
        """Connect once `proc` listens on `path`; fail at once, with its log, if it exits."""

        def connected() -> Monitor | None:
            if not proc.alive():
                raise AssertionError(f"{proc.name} exited {proc.returncode}:\n{proc.log()}")
            try:
                return cls(path, timeout, proc)
            except (FileNotFoundError, ConnectionRefusedError):
                return None

        return wait_until(connected, timeout, f"{proc.name}'s monitor on {path}")  # type: ignore[return-value]

    def _read(self) -> dict[str, Any]:
        try:
            line = self._file.readline()
        except ConnectionResetError:
            line = b""
        if not line:
            said = f"; {self.proc.name} said:\n{self.proc.log()}" if self.proc else ""
            raise MonitorClosed(f"the monitor on {self.path} closed{said}")
        return json.loads(line)

    def execute(self, name: str, /, **arguments: Any) -> Any:
        """Run a command; its return value."""
        self._id += 1
        request: dict[str, Any] = {"execute": name, "id": self._id}
        if arguments:
            request["arguments"] = arguments
        self.sock.sendall(json.dumps(request).encode() + b"\n")
        while True:
            answer = self._read()
            if "event" in answer:
                self.events.append(answer)
            elif answer.get("id") == self._id:
                if "error" in answer:
                    raise AssertionError(f"{name} on {self.path}: {answer['error']}")
                return answer["return"]

    def close(self) -> None:
        self._file.close()
        self.sock.close()


def traced(monitor: Monitor, role: str) -> list[dict[str, Any]]:
    """The trace records of every message a daemon carried so far, from a monitor that
    subscribed to the trace; each must be the whole record of one message."""
    monitor.execute("query-status")  # a fence
    records = [e["data"] for e in monitor.events if e["event"] == TRACE]
    halves = [r for r in records if r.get("direction") not in ("in", "out") or r["role"] != role]
    assert halves == [], "records of no message: each message is traced once, by its channel"
    return records


def received_on_main(records: list[dict[str, Any]]) -> list[str]:
    """The requests a back-end's trace shows arriving on its main channel, in order."""
    return [r["request"] for r in records if r["channel"] == "main" and r["direction"] == "in"]


def logged_on_main(log: str) -> list[str]:
    """The requests backend_sim -v logged as they arrived, in order."""
    return re.findall(r"main channel: (\S+) ", log)


@dataclass(frozen=True)
class QemuDevice:
    """One of QEMU 7.2's vhost-user device types, and what its realize looks like."""

    qdev: str
    #: realize sends SET_VRING_CALL and SET_VRING_ERR for each (docs/protocol.md §4 step 5)
    queues: int
    #: realize ends with GET_CONFIG (vhost_dev_get_config); QEMU acks CONFIG only then
    reads_config: bool
    backend_args: tuple[str, ...] = ()
    #: what QEMU may warn about, in full
    warnings: tuple[str, ...] = ()
    #: QEMU 7.2 initializes it only under KVM ("vhost initialization failed: requires kvm")
    needs_kvm: bool = False
    #: CONFIG is acked (offered, and a feature of the device type)
    config_acked: bool | None = None


#: QEMU 7.2 says so when a back-end offers CONFIG to a device type without config space.
CONFIG_UNUSED = "vhost-user backend supports VHOST_USER_PROTOCOL_F_CONFIG but QEMU does not."
#: the device types whose realize reads their config space at once
READ_AT_REALIZE = {"gpio", "vsock", "blk"}
#: the device types that keep their config space in QEMU (the back-end's is not asked for)
CONFIG_IN_QEMU = {"rng", "fs", "i2c", "scsi"}


def _preset_case(preset: Preset) -> Any:
    """backend_sim --device NAME under QEMU's vhost-user-NAME-pci: realized, no warning."""
    assert preset.qdev is not None
    qdev = ",".join((preset.qdev, *preset.qdev_properties))
    device = QemuDevice(qdev, preset.queues, preset.name in READ_AT_REALIZE,
                        ("--device", preset.name), needs_kvm=preset.needs_kvm,
                        config_acked=bool(preset.config))  # fmt: skip
    return pytest.param(device, id=preset.name)


def _default_case(preset: Preset) -> Any:
    """The same QEMU device against backend_sim as it is by default: it realizes too,
    QEMU warning only where it keeps the config space itself and CONFIG was offered."""
    assert preset.qdev is not None
    qdev = ",".join((preset.qdev, *preset.qdev_properties))
    warns = (CONFIG_UNUSED,) if preset.name in CONFIG_IN_QEMU else ()
    device = QemuDevice(qdev, PRESETS[DEFAULT].queues, preset.name in READ_AT_REALIZE,
                        warnings=warns, needs_kvm=preset.needs_kvm,
                        config_acked=preset.name not in CONFIG_IN_QEMU)  # fmt: skip
    return pytest.param(device, id=f"default-as-{preset.name}")


WITH_QEMU_DEVICE = [p for p in PRESETS.values() if p.qdev is not None]
QEMU_DEVICES = [_preset_case(p) for p in WITH_QEMU_DEVICE] + [
    _default_case(p) for p in WITH_QEMU_DEVICE
]


def accelerator(device: QemuDevice) -> str:
    if not device.needs_kvm:
        return "tcg"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        qdev = device.qdev.split(",")[0]
        pytest.skip(f"QEMU 7.2 initializes {qdev} only under KVM ('vhost initialization "
                    "failed: requires kvm'), and /dev/kvm is not usable here")  # fmt: skip
    return "kvm"


@pytest.mark.parametrize("device", QEMU_DEVICES)
def test_qemu_realizes_a_vhost_user_device_against_backend_sim(
    spawn, tmp_path, device: QemuDevice
) -> None:
    qemu = need("qemu-system-x86_64")
    accel = accelerator(device)
    sock, control, qmp = (str(tmp_path / name) for name in ("vhost.sock", "be.ctl", "qmp.sock"))
    be = spawn("backend_sim", "--listen", sock, "--control", control, "-v",
               *device.backend_args)  # fmt: skip
    be.wait_state("listening")
    be_monitor = Monitor.of(be, control)
    be_monitor.execute("subscribe", events=[TRACE])
    vm = spawn(
        qemu,
        "-S",
        "-display", "none",
        "-nodefaults",
        "-machine", f"q35,accel={accel}",
        "-m", "128",
        "-object", "memory-backend-memfd,id=mem,size=128M,share=on",
        "-numa", "node,memdev=mem",
        "-chardev", f"socket,id=vu,path={sock}",
        "-device", f"{device.qdev},chardev=vu,id=vu-dev",
        "-qmp", f"unix:{qmp},server=on,wait=off",
        "-monitor", "none",
        "-serial", "none",
        name="qemu",
    )  # fmt: skip
    # QMP runs commands only once every -device is realized; an abort closes it.
    vm_monitor = Monitor.of(vm, qmp)
    realized = vm_monitor.execute("qom-get", path="/machine/peripheral/vu-dev",
                                  property="realized")  # fmt: skip
    assert realized is True
    # ... and it stays up: QEMU and backend_sim still answer, the connection still stands
    assert vm_monitor.execute("query-status")["status"] == "prelaunch"
    assert be_monitor.execute("query-status")["state"] == "connected"
    assert vm.alive() and be.alive()

    log = be.log()
    trace = traced(be_monitor, "backend")
    assert received_on_main(trace) == logged_on_main(log), "each message traced once"
    order = [
        "GET_FEATURES",
        "GET_PROTOCOL_FEATURES",
        "SET_PROTOCOL_FEATURES",
        "SET_BACKEND_REQ_FD",
        "SET_OWNER",
        *["SET_VRING_CALL", "SET_VRING_ERR"] * device.queues,
        *(["GET_CONFIG"] if device.reads_config else []),
    ]
    received = iter(received_on_main(trace))
    assert all(name in received for name in order), (
        f"QEMU's realize order as §4 describes it: {order} in {received_on_main(trace)}"
    )
    # QEMU 7.2 does not know SHMEM: it masks the bit out and never asks for the layout
    assert "GET_SHMEM_CONFIG" not in log
    negotiated = re.search(r"negotiated (\S+)", log)
    assert negotiated is not None
    acked = negotiated[1].split(",")
    assert "REPLY_ACK" in acked
    assert "SHMEM" not in acked
    assert ("CONFIG" in acked) == device.config_acked
    assert "ERROR" not in log and "WARNING" not in log and "Traceback" not in log
    # under KVM QEMU also says which CPU features the host lacks: not the device's business
    warnings = re.findall(r"warning: (?!host doesn't support requested feature)(.*)", vm.log())
    assert tuple(warnings) == device.warnings, vm.log()


def test_front_end_handshakes_with_qemu_storage_daemon(spawn, tmp_path) -> None:
    qsd = need("qemu-storage-daemon")
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * (4 << 20))
    sock, control, qmp = (str(tmp_path / name) for name in ("blk.sock", "fe.ctl", "qmp.sock"))
    daemon = spawn(
        qsd,
        "--blockdev", f"driver=file,node-name=file0,filename={disk}",
        "--export",
        f"type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,addr.path={sock},writable=on",
        "--chardev", f"socket,id=qmp,path={qmp},server=on,wait=off",
        "--monitor", "chardev=qmp",
        name="qsd",
    )  # fmt: skip
    wait_until(lambda: os.path.exists(sock), 15, "qemu-storage-daemon's socket")
    fe = spawn("frontend", "--connect", sock, "--control", control)
    fe.wait_connected(shmem=False, timeout=15)
    log = fe.log()
    assert "does not offer SHMEM (protocol feature bit 22)" in log
    assert "acked MQ,REPLY_ACK,BACKEND_REQ,BACKEND_SEND_FD" in log
    # both still up after the handshake: each answers, the export and the connection stand
    exports = Monitor.of(daemon, qmp).execute("query-block-exports")
    assert [(e["id"], e["shutting-down"]) for e in exports] == [("exp0", False)]
    assert Monitor.of(fe, control).execute("query-status")["state"] == "connected"
    assert fe.alive() and daemon.alive()
    assert fe.stop() == 0
    assert "Traceback" not in fe.log()
