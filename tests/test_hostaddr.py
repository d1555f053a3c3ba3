"""The node tier's fixed address is claimed by one run at a time: a second run waits, a killed run's address is
taken back, a live cluster's is refused (harness/hostaddr.py). A CI run once failed on an address a run killed
mid-way had left on lo."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator

import pytest

from harness import hostaddr
from tests.conftest import need

pytestmark = pytest.mark.netns

ADDRESS = "198.18.253.251"


@pytest.fixture
def address() -> Iterator[str]:
    need(os.geteuid() == 0, "adding an address to lo needs root")
    yield ADDRESS
    subprocess.run(["ip", "addr", "del", f"{ADDRESS}/32", "dev", "lo"], capture_output=True)


def test_a_second_claim_waits_for_the_first_then_fails_naming_the_holder(address: str) -> None:
    first = hostaddr.Claim(address)
    try:
        assert hostaddr.on_loopback(address)
        with pytest.raises(TimeoutError, match=rf"claimed by pid {os.getpid()}"):
            hostaddr.Claim(address, wait=1.5)
        assert hostaddr.on_loopback(address), "the waiting claim took the holder's address away"
    finally:
        first.release()
    assert not hostaddr.on_loopback(address)
    hostaddr.Claim(address, wait=1.5).release()  # free again once released


def test_an_address_a_killed_run_left_on_lo_is_taken_back(address: str) -> None:
    subprocess.run(["ip", "addr", "add", f"{address}/32", "dev", "lo"], check=True)
    claim = hostaddr.Claim(address, wait=1.5)
    assert hostaddr.on_loopback(address)
    claim.release()
    assert not hostaddr.on_loopback(address)


def test_an_address_a_live_server_listens_on_is_refused_and_left_in_place(address: str) -> None:
    subprocess.run(["ip", "addr", "add", f"{address}/32", "dev", "lo"], check=True)
    with socket.socket() as server:
        server.bind((address, 0))
        server.listen()
        assert hostaddr.listened_on(address)
        with pytest.raises(RuntimeError, match="make cluster-down"):
            hostaddr.Claim(address, wait=1.5)
        assert hostaddr.on_loopback(address)
    assert not hostaddr.listened_on(address)
