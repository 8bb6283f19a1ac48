"""The daemon's own Ray head: token authentication is what guards it, and an operator who
turns that off is told what it exposes."""

from __future__ import annotations

import json

import pytest

from launcher.daemon.rayhead import ensure_head, exposure_warning, head_file, stop_head

pytestmark = pytest.mark.slow  # real Ray heads


@pytest.mark.parametrize("auth_mode", [None, "disabled"])
def test_a_head_without_token_authentication_is_reported(tmp_path, monkeypatch, auth_mode):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "")  # restored afterwards: connecting sets it
    if auth_mode is None:  # Ray's own default, as a user's shell has it
        monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    else:
        monkeypatch.setenv("RAY_AUTH_MODE", auth_mode)
    try:
        ensure_head(tmp_path, num_cpus=1)
        recorded = json.loads(head_file(tmp_path).read_text())["auth_mode"]
        warning = exposure_warning(tmp_path)
    finally:
        stop_head(tmp_path)
    if auth_mode is None:
        assert recorded == "token" and warning is None
    else:
        assert recorded == "disabled"
        assert "RAY_AUTH_MODE=disabled" in warning and "every interface" in warning


def test_a_head_that_fails_to_start_is_started_again(tmp_path, monkeypatch):
    """Ray 2.60 gives its raylet a fixed 30 s to register; on a busy machine the head then
    exits while starting. The next start is tried; the failed one leaves no process."""
    import subprocess
    import sys

    from launcher.daemon import rayhead

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    real_spawn, failed = rayhead._spawn, []

    def spawn(state_dir, num_cpus):
        if not failed:  # the first start: a head that exits while starting
            failed.append(subprocess.Popen([sys.executable, "-c", "raise SystemExit(1)"]))
            return failed[0]
        return real_spawn(state_dir, num_cpus)

    monkeypatch.setattr(rayhead, "_spawn", spawn)
    try:
        address = ensure_head(tmp_path, num_cpus=1)
        assert failed and failed[0].returncode == 1
        assert json.loads(head_file(tmp_path).read_text())["address"] == address
    finally:
        stop_head(tmp_path)
