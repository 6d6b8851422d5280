"""Each front-end profile as a real process, paired with backend_sim running each of
its scenarios: the two tables agree with each other and with /proc, and a reset does
what that front-end's reset does."""

from __future__ import annotations

import pytest

from shmemctl.control import ControlClient, ControlError
from shmemctl.session import PROFILES

from .conftest import MiB

SCENARIOS = ("blobs", "dax")


def ranges_of_frontend(status: dict) -> set[tuple[int, int, int]]:
    return {(r["shmid"], m["shm_offset"], m["len"]) for r in status["regions"]
            for m in r["mappings"]}  # fmt: skip


def ranges_of_backend(status: dict) -> set[tuple[int, int, int]]:
    return {(m["shmid"], m["shm_offset"], m["len"]) for m in status["mapped"]}


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_each_profile_serves_each_scenario_and_resets_as_it_does(
    spawn, tmp_path, profile: str, scenario: str
) -> None:
    sock = str(tmp_path / "vhost.sock")
    # one power-of-two BAR's worth, as QEMU needs
    be = spawn("backend_sim", "--listen", sock, "--regions", "0=56M,2=8M",
               "--control", str(tmp_path / "be.ctl"), "--reply-timeout", "60")  # fmt: skip
    be.wait_state("listening")
    fe = spawn("frontend", "--connect", sock, "--control", str(tmp_path / "fe.ctl"),
               "--profile", profile)  # fmt: skip
    assert fe.wait_connected()["profile"] == profile
    with ControlClient(str(be.control)) as sim, ControlClient(str(fe.control)) as vmm:
        sim.execute("scenario-start", name=scenario, rate=2000, seed=7)
        be.wait_status(lambda s: s["scenario"]["maps"] >= 20, "20 maps")
        sim.execute("scenario-stop")  # its last answer is in: both tables are final
        front = vmm.execute("query-status", max_mappings=1 << 20)
        back = sim.execute("query-status")
        assert ranges_of_frontend(front) == ranges_of_backend(back) != set()
        assert front["disagreements"] == []  # and /proc/PID/maps holds each of them
        stats = back["scenario"]
        assert stats["failed"] == 0, stats
        held = len(ranges_of_frontend(front))
        reset = vmm.execute("reset")
        after = vmm.execute("query-status", max_mappings=1 << 20)
        # the device hears of it (RESET_DEVICE, or only its rings stopping) and forgets
        be.wait_status(lambda s: s["mapped_count"] == 0, "the device to forget its mappings")
        if profile == "crosvm":  # crosvm's reset leaves the mappings in place
            assert reset["dropped"] == 0 and len(ranges_of_frontend(after)) == held
        else:
            assert reset["dropped"] == held and ranges_of_frontend(after) == set()
            assert reset["via"] == ("SET_VRING_ENABLE" if profile == "qemu" else "RESET_DEVICE")
        assert after["disagreements"] == []
        # the device works on after it: the next map lands (crosvm serves region 0 only)
        if profile == "crosvm":
            with pytest.raises(ControlError, match="ENODEV"):  # no such region, to crosvm
                sim.execute("map", shmid=2, shm_offset=7 * MiB, len=64 << 10)
        else:
            done = sim.execute("map", shmid=2, shm_offset=7 * MiB, len=64 << 10)
            assert done["shm_offset"] == 7 * MiB
        assert vmm.execute("query-status")["state"] == "connected"
