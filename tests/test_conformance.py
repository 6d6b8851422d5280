"""The conformance suite passes our daemons, catches every injected fault by name, fails
a peer that goes away mid-suite (and says which checks could not run), and judges real
QEMU peers for what applies to them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable

import pytest

from shmemctl.conformance import Report, check_backend, check_frontend, parse_layout
from shmemctl.conformance import backend as backend_suite
from shmemctl.conformance import frontend as frontend_suite
from shmemctl.faults import BACKEND_FAULTS, FRONTEND_FAULTS
from shmemctl.session import PROFILES
from shmemctl.shmem.rules import Refusal, ShmemRefused, check_request

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
    "exit-mid-handshake": {"stays-connected"},
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
#: Faults caught only where the suite plays a front-end that behaves a certain way:
#: (the profile, the checks that fail, more backend_sim options). Each check a profile
#: adds, and the reset check under QEMU's ring-stopping reset, is here.
PROFILE_CAUGHT_BY = {
    # it must not give up on the held map (its own reply timeout) within the check
    "block-main-while-mapping": ("qemu", {"serves-main-while-mapping"},
                                 ("--reply-timeout", "60")),
    # the believed-but-refused maps are unmapped soon by a busy scenario
    "positive-reply-is-success": ("qemu", {"nonzero-reply-refuses"}, ("--scenario-rate", "200")),
    "keep-first-backend-channel": ("cloud-hypervisor", {"fresh-backend-channel"}, ()),
}
PROFILE_CASES = [
    *[pytest.param(f, p, checks, extra, id=f"{p}-{f}")
      for f, (p, checks, extra) in PROFILE_CAUGHT_BY.items()],
    pytest.param("unmap-after-reset", "qemu", {"no-unmap-after-reset"}, (),
                 id="qemu-unmap-after-reset"),
]  # fmt: skip

#: Checks shown to fail by a test of their own rather than by a fault switch.
SHOWN_ELSEWHERE = {
    "frontend": {
        "connects",  # test_nobody_on_the_socket_fails_connects_and_runs_nothing_else
        "shmem-at-bit-22",  # test_shmem_at_the_wrong_bit_is_caught_when_shmem_is_required
    },
    "backend": {
        "connects",  # test_nobody_on_the_socket_fails_connects_and_runs_nothing_else
        "shmem-at-bit-22",  # test_shmem_at_the_wrong_bit_is_caught_when_shmem_is_required
        "stays-connected",  # test_a_backend_that_hangs_up_mid_handshake_fails_the_suite
    },
}

#: Generous last resorts: a reply comes in milliseconds, a map from backend_sim's scenario
#: within about a second of the backend channel opening.
TIMEOUT = 10.0
WAIT = 3.0


def test_every_fault_has_its_check() -> None:
    assert set(FRONTEND_CAUGHT_BY) == set(FRONTEND_FAULTS)
    assert set(BACKEND_CAUGHT_BY) | set(PROFILE_CAUGHT_BY) == set(BACKEND_FAULTS)


def test_every_check_is_tripped_by_a_fault_or_a_test_of_its_own() -> None:
    shown = set().union(*FRONTEND_CAUGHT_BY.values()) | SHOWN_ELSEWHERE["frontend"]
    assert set(frontend_suite.CHECKS) - shown == set()
    shown = set().union(*BACKEND_CAUGHT_BY.values()) | SHOWN_ELSEWHERE["backend"]
    shown |= set().union(*(checks for _p, checks, _e in PROFILE_CAUGHT_BY.values()))
    assert (set(backend_suite.CHECKS) | set(backend_suite.PROFILE_CHECKS)) - shown == set()


def complete(report: Report) -> Report:
    """Every check the run planned has exactly one verdict."""
    assert sorted(r.check for r in report.results) == sorted(report.plan), report.to_text()
    return report


def listen_for_a_frontend(tmp_path, **options) -> tuple[str, Callable[[], Report]]:
    """The suite listening in a thread; the socket, and how to get its report."""
    sock = str(tmp_path / "suite.sock")
    box: list[Report] = []
    suite = threading.Thread(target=lambda: box.append(
        check_frontend(sock, timeout=TIMEOUT, **options)))  # fmt: skip
    suite.start()
    wait_until(lambda: os.path.exists(sock), 10, "the suite to listen")

    def report() -> Report:
        suite.join(60)
        assert box, "the suite did not finish"
        return complete(box[0])

    return sock, report


def run_against_frontend(spawn, tmp_path, *faults: str, extra: tuple[str, ...] = (),
                         name: str = "frontend", **options) -> Report:  # fmt: skip
    sock, report = listen_for_a_frontend(tmp_path, **options)
    args = ["--connect", sock, "--control", str(tmp_path / f"{name}.ctl"), *extra]
    for fault in faults:
        args += ["--fault", fault]
    spawn("frontend", *args, name=name)
    return report()


def run_against_backend(spawn, tmp_path, *faults: str, extra: tuple[str, ...] = (),
                        **options) -> Report:  # fmt: skip
    sock = str(tmp_path / "device.sock")
    args = ["--listen", sock, "--regions", "0=8M,2=64K", "--scenario", "blobs",
            "--scenario-rate", "50", "--control", str(tmp_path / "be.ctl"), *extra]  # fmt: skip
    for fault in faults:
        args += ["--fault", fault]
    be = spawn("backend_sim", *args)
    be.wait_state("listening")
    return complete(check_backend(sock, wait=WAIT, timeout=TIMEOUT, **options))


def failed(report: Report) -> set[str]:
    return {r.check for r in report.failed}


def verdicts(report: Report) -> dict[str, str]:
    return {r.check: r.verdict for r in report.results}


def test_our_frontend_passes_everything(spawn, tmp_path) -> None:
    report = run_against_frontend(spawn, tmp_path)
    assert report.ok and failed(report) == set(), report.to_text()
    assert set(verdicts(report).values()) == {"pass"}, report.to_text()
    assert len(report.results) >= 30


@pytest.mark.parametrize("fault", sorted(FRONTEND_CAUGHT_BY))
def test_each_frontend_fault_is_caught_by_name(spawn, tmp_path, fault: str) -> None:
    report = run_against_frontend(spawn, tmp_path, fault)
    assert FRONTEND_CAUGHT_BY[fault] <= failed(report), report.to_text()


def test_shmem_at_the_wrong_bit_is_caught_when_shmem_is_required(spawn, tmp_path) -> None:
    """A front-end built for vhost 0.16 (SHMEM at 21) does not ack bit 22; nor does a
    back-end built for it offer it."""
    report = run_against_frontend(spawn, tmp_path, extra=("--shmem-bit", "21"),
                                  require_shmem=True)  # fmt: skip
    assert "shmem-at-bit-22" in failed(report), report.to_text()
    report = run_against_backend(spawn, tmp_path, extra=("--shmem-bit", "21"),
                                 require_shmem=True)  # fmt: skip
    assert "shmem-at-bit-22" in failed(report), report.to_text()


def test_a_front_end_that_declines_shmem_is_not_applicable_not_failed(spawn, tmp_path) -> None:
    """Declining is no fault: what needs SHMEM is n/a, and the suite passes."""
    report = run_against_frontend(spawn, tmp_path, extra=("--shmem-bit", "21"),
                                  offer_bit_21=False)  # fmt: skip
    assert report.ok, report.to_text()
    v = verdicts(report)
    assert v["shmem-at-bit-22"] == v["map-acked-once"] == "n/a"
    assert v["stays-connected"] == v["requests-well-formed"] == "pass"
    (note,) = {r.note for r in report.results if r.check in frontend_suite.MAP_CHECKS}
    assert "did not ack SHMEM (bit 22)" in note


def test_a_frontend_that_dies_mid_handshake_fails_the_suite(spawn, tmp_path) -> None:
    """Issue #9 item 11, on the command line: it sent SET_BACKEND_REQ_FD, then died."""
    sock = str(tmp_path / "suite.sock")
    suite = spawn(sys.executable, "-m", "shmemctl", "conformance", "--frontend", sock,
                  "--timeout", str(TIMEOUT), "--json", name="suite")  # fmt: skip
    wait_until(lambda: os.path.exists(sock), 10, "the suite to listen")
    frontend = spawn("frontend", "--connect", sock, "--control", str(tmp_path / "fe.ctl"),
                     "--fault", "exit-mid-handshake")  # fmt: skip
    assert suite.wait_exit(60) == 1, suite.log()
    assert frontend.wait_exit(10) == 1  # it really died
    report = json.loads(suite.out_path.read_text())
    results = {r["check"]: r for r in report["results"]}
    gone = "the front-end hung up after it sent SET_BACKEND_REQ_FD"
    assert results["stays-connected"]["verdict"] == "fail"
    assert results["stays-connected"]["arrived"] == gone
    for check in frontend_suite.MAP_CHECKS:
        assert results[check]["verdict"] == "not run", results[check]
        assert results[check]["note"] == f"could not run: {gone}"
    # what it did before it died is judged, and passes
    for check in ("requests-well-formed", "protocol-features-before-backend-channel",
                  "acks-only-offered-features", "shmem-at-bit-22", "backend-channel-fd"):
        assert results[check]["verdict"] == "pass", results[check]
    assert report["summary"] == {"pass": 9, "fail": 1, "n/a": 0,
                                 "not run": len(frontend_suite.MAP_CHECKS)}  # fmt: skip


#: A peer that does part of its side of the protocol and exits: a real process on a real
#: socket. `frontend PATH`: handshakes, then exits at the first SHMEM request, unanswered.
#: `backend PATH`: answers the two getters (offering SHMEM), then exits at anything else.
HALF_A_PEER = """
import os, socket, sys
from shmemctl.channel import Channel
from shmemctl.wire import ChannelKind, FrontendReq as F, encode
from shmemctl.wire.constants import ProtocolFeature as PF

MAIN, BACKEND = ChannelKind.MAIN, ChannelKind.BACKEND
FEATURES = (1 << 30) | (1 << 32)
WANTED = PF.REPLY_ACK | PF.BACKEND_REQ | PF.BACKEND_SEND_FD | (1 << 22)
role, path = sys.argv[1:]
if role == "frontend":
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(path)
    main = Channel(sock, MAIN, replies=True)

    def ask(req, payload=None, fds=(), reply=False):
        main.send(encode(MAIN, req, payload, need_reply=reply and req not in GETTERS), fds)
        return main.recv().payload if reply else None

    GETTERS = (F.GET_FEATURES, F.GET_PROTOCOL_FEATURES, F.GET_SHMEM_CONFIG)
    ask(F.GET_FEATURES, reply=True)
    ask(F.SET_PROTOCOL_FEATURES, ask(F.GET_PROTOCOL_FEATURES, reply=True) & WANTED)
    ask(F.SET_OWNER)
    ask(F.GET_SHMEM_CONFIG, reply=True)
    ours, theirs = socket.socketpair()
    ask(F.SET_BACKEND_REQ_FD, None, (theirs.fileno(),), reply=True)
    ask(F.SET_FEATURES, FEATURES, reply=True)
    request = Channel(ours, BACKEND, replies=False).recv()
else:
    # made under another name and moved into place: once the path exists, it listens
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path + ".new")
    listener.listen(1)
    os.rename(path + ".new", path)
    main = Channel(listener.accept()[0], MAIN, replies=False)
    answers = {F.GET_FEATURES: FEATURES, F.GET_PROTOCOL_FEATURES: int(WANTED)}
    while (request := main.recv()).request in answers:
        main.send(encode(MAIN, request.request, answers[request.request], reply=True))
print("hanging up at", request.name, file=sys.stderr, flush=True)
"""


def test_a_frontend_that_hangs_up_at_its_first_map_fails_the_suite(spawn, tmp_path) -> None:
    sock, result = listen_for_a_frontend(tmp_path)
    peer = spawn(sys.executable, "-c", HALF_A_PEER, "frontend", sock, name="peer")
    report = result()
    assert "hanging up at SHMEM_MAP" in peer.log()
    gone = "the front-end hung up after it sent SET_FEATURES, during map-acked-once"
    assert failed(report) == {"stays-connected"}, report.to_text()
    (stays,) = [r for r in report.results if r.check == "stays-connected"]
    assert stays.arrived == gone
    for r in report.results:
        if r.check in frontend_suite.MAP_CHECKS:
            assert (r.verdict, r.note) == ("not run", f"could not run: {gone}")
        elif r.check != "stays-connected":
            assert r.verdict == "pass", report.to_text()
    text = report.to_text()
    assert f"note:     could not run: {gone}" in text
    assert text.endswith(f"1 failed, 0 not applicable, {len(frontend_suite.MAP_CHECKS)} not run")


def test_a_backend_that_hangs_up_mid_handshake_fails_the_suite(spawn, tmp_path) -> None:
    sock = str(tmp_path / "device.sock")
    peer = spawn(sys.executable, "-c", HALF_A_PEER, "backend", sock, name="peer")
    wait_until(lambda: os.path.exists(sock), what="the peer's socket")
    report = complete(check_backend(sock, wait=WAIT, timeout=TIMEOUT))
    assert "hanging up at SET_PROTOCOL_FEATURES" in peer.log()
    gone = "the back-end hung up after it answered GET_FEATURES, during SET_PROTOCOL_FEATURES"
    assert failed(report) == {"stays-connected"}, report.to_text()
    v = verdicts(report)
    passed = ["connects", "get-features", "get-protocol-features", "never-offers-bit-21",
              "shmem-at-bit-22", "offers-what-shmem-needs"]  # fmt: skip
    assert [c for c in backend_suite.CHECKS if v[c] == "pass"] == passed
    assert {r.note for r in report.results if r.verdict == "not run"} == {
        f"could not run: {gone}"
    }
    assert len(report.results) == len(passed) + 1 + report.counts()["not run"]


def test_nobody_on_the_socket_fails_connects_and_runs_nothing_else(tmp_path) -> None:
    nobody = str(tmp_path / "nobody.sock")
    for report in (check_backend(nobody), check_frontend(nobody, listen=False)):
        complete(report)
        assert failed(report) == {"connects"}, report.to_text()
        assert report.counts()["not run"] == len(report.plan) - 1
        assert not report.ok


def test_the_layout_offered_to_a_front_end_is_chosen_with_regions(spawn, tmp_path) -> None:
    """QEMU puts all regions in one BAR of a power-of-two size: 4M + 4M fits it."""
    report = run_against_frontend(spawn, tmp_path, regions=parse_layout("0=4M,2=4M"))
    assert report.ok and not failed(report), report.to_text()
    fe_log = (tmp_path / "frontend.log").read_text()  # spawn keeps it as NAME.log
    assert "region 2: 0x400000 reserved" in fe_log, fe_log
    # Without a gap below the highest shmid, a zero-size region cannot be asked for.
    report = run_against_frontend(spawn, tmp_path, regions=parse_layout("0=1M"), name="fe2")
    assert report.ok, report.to_text()
    (zero_size,) = [r for r in report.results if r.check == "refuses-zero-size-shmid"]
    assert zero_size.verdict == "n/a" and "--regions" in zero_size.note


def test_regions_too_small_for_the_map_checks_are_refused_up_front(tmp_path) -> None:
    with pytest.raises(ValueError, match="at least"):
        parse_layout("0=64K")
    done = subprocess.run(
        [sys.executable, "-m", "shmemctl", "conformance", "--frontend", str(tmp_path / "s"),
         "--regions", "0=64K"], capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and "--regions" in done.stderr, done.stderr
    assert not (tmp_path / "s").exists()
    done = subprocess.run([sys.executable, "-m", "shmemctl", "conformance", "--help"],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert "power of two" in " ".join(done.stdout.split())


def test_backend_sim_passes_everything(spawn, tmp_path) -> None:
    report = run_against_backend(spawn, tmp_path)
    assert report.ok and failed(report) == set(), report.to_text()
    assert set(verdicts(report).values()) == {"pass"}, report.to_text()


@pytest.mark.parametrize("fault", sorted(BACKEND_CAUGHT_BY))
def test_each_backend_fault_is_caught_by_name(spawn, tmp_path, fault: str) -> None:
    report = run_against_backend(spawn, tmp_path, fault)
    assert BACKEND_CAUGHT_BY[fault] <= failed(report), report.to_text()


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_backend_sim_passes_everything_under_each_front_ends_behaviour(
    spawn, tmp_path, profile: str
) -> None:
    report = run_against_backend(spawn, tmp_path, profile=PROFILES[profile])
    assert report.ok and failed(report) == set(), report.to_text()
    assert set(verdicts(report).values()) == {"pass"}, report.to_text()
    assert set(report.plan) == set(backend_suite.checks_for(PROFILES[profile]))


@pytest.mark.parametrize(("fault", "profile", "checks", "extra"), PROFILE_CASES)
def test_each_profile_check_fails_against_the_fault_that_breaks_it(
    spawn, tmp_path, fault: str, profile: str, checks: set[str], extra: tuple[str, ...]
) -> None:
    report = run_against_backend(spawn, tmp_path, fault, extra=extra, profile=PROFILES[profile])
    assert checks <= failed(report), report.to_text()


def test_a_failure_report_says_what_arrived_and_where_the_rule_is(spawn, tmp_path) -> None:
    report = run_against_frontend(spawn, tmp_path, "skip-overlap-check")
    (result,) = [r for r in report.results if r.check == "refuses-overlap"]
    assert result.passage == "§5 step 10"
    assert result.expected.startswith("exactly one reply, flags 0x5, u64 non-zero (overlaps ")
    assert "shmemctl answers -EEXIST" in result.expected
    assert result.arrived[0]["request"] == "SHMEM_MAP" and result.arrived[0]["payload"] == 0
    text = report.to_text()
    assert "FAIL  refuses-overlap" in text and "arrived:" in text


def test_the_command_line_speaks_json_and_exits_1_on_failure(spawn, tmp_path) -> None:
    sock = str(tmp_path / "device.sock")
    be = spawn("backend_sim", "--listen", sock, "--fault", "offer-bit-21",
               "--control", str(tmp_path / "be.ctl"))  # fmt: skip
    be.wait_state("listening")
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
    sock, result = listen_for_a_frontend(tmp_path)
    spawn(qemu, "-S", "-display", "none", "-nodefaults", "-machine", "q35,accel=tcg", "-m", "128",
          "-object", "memory-backend-memfd,id=mem,size=128M,share=on", "-numa", "node,memdev=mem",
          "-chardev", f"socket,id=vu,path={sock}", "-device", "vhost-user-rng-pci,chardev=vu",
          "-monitor", "none", "-serial", "none", name="qemu")  # fmt: skip
    report = result()
    assert report.ok and failed(report) == set(), report.to_text()
    v = verdicts(report)
    assert v["protocol-features-before-backend-channel"] == "pass"
    assert v["never-claims-bit-21"] == v["stays-connected"] == "pass"
    assert v["shmem-at-bit-22"] == v["map-acked-once"] == "n/a"  # QEMU 7.2 predates SHMEM


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
    report = complete(check_backend(sock, wait=0.5, timeout=TIMEOUT))
    # libvhost-user (QEMU 7.2) answers a getter sent with NEED_REPLY with flags 0xd: it
    # echoes NEED_REPLY into the reply, where the docs/protocol.md (§2) wants exactly 0x5.
    assert failed(report) == {"need-reply-on-a-getter"}, report.to_text()
    (finding,) = report.failed
    assert "flags 0xd" in json.dumps(finding.arrived)
    v = verdicts(report)
    assert v["get-features"] == v["stays-connected"] == "pass" and v["shmem-at-bit-22"] == "n/a"


@pytest.mark.parametrize("regions", [None, "0=4M,2=4M", "5=1M"])
def test_each_refusal_the_suite_expects_is_the_rulebook_s(regions: str | None) -> None:
    """The crafted requests are wrong for the reason their check names: the rulebook
    refuses each for that rule, or (fd count, file size) finds the request itself sound."""
    layout = frontend_suite.Layout(frontend_suite.parse_layout(regions))
    cases = frontend_suite.refusal_cases(layout, buffer=-1)
    assert len(cases) == 15
    for case in cases:
        if isinstance(case, str):
            assert case in ("refuses-unknown-shmid", "refuses-zero-size-shmid")
            continue
        assert frontend_suite.CHECKS[case.check] == case.refusal.passage
        if case.refusal in (Refusal.BAD_FD_COUNT, Refusal.FILE_TOO_SHORT):
            assert case.reading == "", case
        elif case.refusal in (Refusal.OVERLAP, Refusal.NOT_A_MAPPING):
            check_request(layout.regions, case.m, is_map=case.request == frontend_suite.MAP)
            assert case.reading, case
        else:
            with pytest.raises(ShmemRefused) as refused:
                check_request(layout.regions, case.m, is_map=True)
            assert refused.value.reason is case.refusal and case.reading == refused.value.detail
