"""Which run owners count as gone: only a process of this machine that certainly ended."""

from __future__ import annotations

import os
import subprocess
import sys

from fairdiffusion.tracking import owner_has_ended, process_owner


def _ended_owner() -> str:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    owner = process_owner().rsplit(":", 2)[0] + f":{process.pid}:"
    process.wait()  # reaped: the pid names no process any more
    return owner


def test_an_ended_or_replaced_process_of_this_machine_has_ended() -> None:
    assert owner_has_ended(_ended_owner())
    machine, pid, started = process_owner().rsplit(":", 2)
    if started:  # a start time is known (Linux): a pid now held by a newer process is not the owner
        assert owner_has_ended(f"{machine}:{pid}:{int(started) - 1}")


def test_a_live_remote_or_malformed_owner_has_not_ended() -> None:
    assert not owner_has_ended(process_owner())
    assert not owner_has_ended("another-host.invalid:" + _ended_owner().rsplit(":", 2)[1] + ":1")
    assert not owner_has_ended(f"{process_owner().rsplit(':', 2)[0]}:{os.getpid()}")  # no start field
    assert not owner_has_ended("")
    assert not owner_has_ended("no-pid")
