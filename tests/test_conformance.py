"""The conformance suite passes our daemons, catches every injected fault by name, and
judges real QEMU peers for what applies to them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest

from shmemctl.conformance import Report, check_backend, check_frontend
from shmemctl.faults import BACKEND_FAULTS, FRONTEND_FAULTS

from .conftest import need, wait_until

#: The checks each deliberate fault must trip (others may fail in its wake).
REFUSALS = {
    "refuses-overlap", "refuses-out-of-bounds", "refuses-zero-length",
    "refuses-misaligned-offset", "refuses-misaligned-length", "refuses-misaligned-fd-offset",
    "refuses-unknown-flags", "refuses-unknown-shmid", "refuses-zero-size-shmid",
    "refuses-overflow", "refuses-map-without-fd", "refuses-map-with-two-fds",
    "refuses-file-too-short", "refuses-partial-unmap", "refuses-unmap-of-a-hole",
    "unknown-request",
}  # fmt: skip
FRONTEND_CAUGHT_BY = {
    "reply-twice": {"map-acked-once"},
    "reply-always": {"no-reply-unless-asked"},
    "no-reply": {"map-acked-once"},
    "bad-reply-flags": {"map-acked-once"},
    "stale-reply": {"map-acked-once"},
    "skip-overlap-check": {"refuses-overlap"},
    "skip-alignment-check": {"refuses-misaligned-length"},
    "ack-gpa": {"never-claims-bit-21"},
    "reply-ok-always": REFUSALS,
    "reply-fail-always": {"map-acked-once", "unasked-map-took-effect", "unmaps-a-whole-mapping",
                          "batch-one-ack", "batch-took-effect",
                          "channel-survives-unknown-request"},
    "ignore-unasked": {"unasked-map-took-effect", "batch-took-effect"},
    "ask-config-twice": {"shmem-config-asked-once"},
    "backend-fd-twice": {"backend-channel-fd"},
    "no-reply-ack": {"reply-ack-with-shmem"},
    "ack-unoffered": {"acks-only-offered-features"},
    "bad-request-flags": {"requests-well-formed"},
    "backend-channel-first": {"protocol-features-before-backend-channel"},
}  # fmt: skip
BACKEND_CAUGHT_BY = {
    "short-shmem-config": {"shmem-config-layout"},
    "bad-nregions": {"shmem-config-layout"},
    "unaligned-config": {"shmem-config-page-multiples"},
    "unstable-config": {"shmem-config-stable"},
    "offer-bit-21": {"never-offers-bit-21"},
    "no-ack": {"acks-when-asked"},
    "ack-twice": {"acks-when-asked"},
    "bad-reply-flags": {"get-features"},
    "map-without-shmem": {"no-shmem-without-negotiation"},
    "unmap-after-reset": {"no-unmap-after-reset"},
    "echo-need-reply": {"need-reply-on-a-getter"},
    "ack-always": {"no-reply-unless-asked"},
    "nregions-mismatch": {"shmem-config-nregions"},
    "shmem-without-reply-ack": {"offers-what-shmem-needs"},
    "map-two-fds": {"shmem-requests-well-formed"},
    "map-out-of-bounds": {"shmem-requests-valid"},
    "short-protocol-features": {"get-protocol-features"},
    "fail-backend-channel": {"backend-channel-acked"},
}


def test_every_fault_has_its_check() -> None:
    assert set(FRONTEND_CAUGHT_BY) == set(FRONTEND_FAULTS)
    assert set(BACKEND_CAUGHT_BY) == set(BACKEND_FAULTS)


def run_against_frontend(spawn, tmp_path, *faults: str, extra: tuple[str, ...] = (),
                         require_shmem: bool = False) -> Report:  # fmt: skip
    sock = str(tmp_path / "suite.sock")
    box: list[Report] = []
    suite = threading.Thread(target=lambda: box.append(
        check_frontend(sock, timeout=30, require_shmem=require_shmem)))  # fmt: skip
    suite.start()
    wait_until(lambda: os.path.exists(sock), 10, "the suite to listen")
    args = ["--connect", sock, "--control", str(tmp_path / "fe.ctl"), *extra]
    for fault in faults:
        args += ["--fault", fault]
    spawn("frontend", *args)
    suite.join(60)
    assert box, "the suite did not finish"
    return box[0]


def run_against_backend(spawn, tmp_path, *faults: str) -> Report:
    sock = str(tmp_path / "device.sock")
    args = ["--listen", sock, "--regions", "0=8M,2=64K", "--scenario", "blobs",
            "--scenario-rate", "50", "--control", str(tmp_path / "be.ctl")]  # fmt: skip
    for fault in faults:
        args += ["--fault", fault]
    be = spawn("backend_sim", *args)
    be.wait_log("listening on")
    return check_backend(sock, wait=1.5)


def failed(report: Report) -> set[str]:
    return {r.check for r in report.failed}


#: Checks shown to fail by a test of their own rather than by a fault switch.
SHOWN_ELSEWHERE = {"shmem-at-bit-22"}  # test_shmem_at_the_wrong_bit_is_caught_...


def test_our_frontend_passes_everything(spawn, tmp_path) -> None:
    report = run_against_frontend(spawn, tmp_path)
    assert failed(report) == set(), report.to_text()
    shown = set().union(*FRONTEND_CAUGHT_BY.values()) | SHOWN_ELSEWHERE
    assert {r.check for r in report.results} - shown == set(), "checks no fault trips"
    assert not [r for r in report.results if r.verdict == "n/a"], report.to_text()
    assert len(report.results) >= 30


@pytest.mark.parametrize("fault", sorted(FRONTEND_CAUGHT_BY))
def test_each_frontend_fault_is_caught_by_name(spawn, tmp_path, fault: str) -> None:
    report = run_against_frontend(spawn, tmp_path, fault)
    assert FRONTEND_CAUGHT_BY[fault] <= failed(report), report.to_text()


def test_shmem_at_the_wrong_bit_is_caught_when_shmem_is_required(spawn, tmp_path) -> None:
    """A front-end built for vhost 0.16 (SHMEM at 21) does not ack bit 22."""
    report = run_against_frontend(spawn, tmp_path, extra=("--shmem-bit", "21"),
                                  require_shmem=True)  # fmt: skip
    assert "shmem-at-bit-22" in failed(report), report.to_text()


def test_backend_sim_passes_everything(spawn, tmp_path) -> None:
    report = run_against_backend(spawn, tmp_path)
    assert failed(report) == set(), report.to_text()
    shown = set().union(*BACKEND_CAUGHT_BY.values())
    assert {r.check for r in report.results} - shown == set(), "checks no fault trips"
    assert not [r for r in report.results if r.verdict == "n/a"], report.to_text()


@pytest.mark.parametrize("fault", sorted(BACKEND_CAUGHT_BY))
def test_each_backend_fault_is_caught_by_name(spawn, tmp_path, fault: str) -> None:
    report = run_against_backend(spawn, tmp_path, fault)
    assert BACKEND_CAUGHT_BY[fault] <= failed(report), report.to_text()


def test_a_failure_report_says_what_arrived_and_where_the_rule_is(spawn, tmp_path) -> None:
    report = run_against_frontend(spawn, tmp_path, "skip-overlap-check")
    (result,) = [r for r in report.results if r.check == "refuses-overlap"]
    assert result.passage == "§5 step 10"
    assert result.expected.startswith("exactly one reply, flags 0x5, u64 a non-zero u64")
    assert result.arrived[0]["request"] == "SHMEM_MAP" and result.arrived[0]["payload"] == 0
    text = report.to_text()
    assert "FAIL  refuses-overlap" in text and "arrived:" in text


def test_the_command_line_speaks_json_and_exits_1_on_failure(spawn, tmp_path) -> None:
    sock = str(tmp_path / "device.sock")
    be = spawn("backend_sim", "--listen", sock, "--fault", "offer-bit-21",
               "--control", str(tmp_path / "be.ctl"))  # fmt: skip
    be.wait_log("listening on")
    done = subprocess.run(
        [sys.executable, "-m", "shmemctl", "conformance", "--backend", sock, "--wait", "0.5",
         "--json"], capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    assert report["role"] == "back-end" and report["summary"]["fail"] >= 1
    assert any(r["check"] == "never-offers-bit-21" and r["verdict"] == "fail"
               for r in report["results"])  # fmt: skip


@pytest.mark.qemu
def test_qemu_as_frontend_passes_what_applies(spawn, tmp_path) -> None:
    qemu = need("qemu-system-x86_64")
    sock = str(tmp_path / "suite.sock")
    box: list[Report] = []
    suite = threading.Thread(target=lambda: box.append(check_frontend(sock, timeout=30)))
    suite.start()
    wait_until(lambda: os.path.exists(sock), 10, "the suite to listen")
    spawn(qemu, "-S", "-display", "none", "-nodefaults", "-machine", "q35,accel=tcg", "-m", "128",
          "-object", "memory-backend-memfd,id=mem,size=128M,share=on", "-numa", "node,memdev=mem",
          "-chardev", f"socket,id=vu,path={sock}", "-device", "vhost-user-rng-pci,chardev=vu",
          "-monitor", "none", "-serial", "none", name="qemu")  # fmt: skip
    suite.join(60)
    report = box[0]
    assert failed(report) == set(), report.to_text()
    verdicts = {r.check: r.verdict for r in report.results}
    assert verdicts["protocol-features-before-backend-channel"] == "pass"
    assert verdicts["never-claims-bit-21"] == "pass"
    assert verdicts["shmem-at-bit-22"] == "n/a"  # QEMU 7.2 predates SHMEM


@pytest.mark.qemu
def test_qemu_storage_daemon_as_backend(spawn, tmp_path) -> None:
    qsd = need("qemu-storage-daemon")
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * (1 << 20))
    sock = str(tmp_path / "blk.sock")
    spawn(qsd, "--blockdev", f"driver=file,node-name=f0,filename={disk}", "--export",
          f"type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={sock}",
          name="qsd")  # fmt: skip
    wait_until(lambda: os.path.exists(sock), 15, "qemu-storage-daemon's socket")
    report = check_backend(sock, wait=0.5)
    # libvhost-user (QEMU 7.2) answers a getter sent with NEED_REPLY with flags 0xd: it
    # echoes NEED_REPLY into the reply, where the brief (§2) wants exactly 0x5.
    assert failed(report) == {"need-reply-on-a-getter"}, report.to_text()
    (finding,) = report.failed
    assert "flags 0xd" in json.dumps(finding.arrived)
    verdicts = {r.check: r.verdict for r in report.results}
    assert verdicts["get-features"] == "pass" and verdicts["shmem-at-bit-22"] == "n/a"
