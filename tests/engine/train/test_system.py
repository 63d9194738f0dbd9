"""`widen doctor`'s checks (engine.train.system.readiness): what this machine has, and a full disk
is reported as not ready, through the real CLI too."""

from __future__ import annotations

import shutil
from collections import namedtuple

from engine.train.system import readiness
from tests.conftest import widen


def test_this_machine_is_ready(tmp_path):
    checks = {check.name: check for check in readiness(tmp_path / "runs")}
    assert {"python", "torch", "CUDA", "NVML", "runs root", "disk free"} <= set(checks)
    assert all(check.ok for check in checks.values()), checks
    assert "created on first run" in checks["runs root"].found


def test_a_full_disk_is_not_ready(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 * 2**30, 10 * 2**30, 2**20))
    full = next(check for check in readiness(tmp_path) if check.name == "disk free")
    assert not full.ok and full.found == "0.0 GiB"


def test_widen_doctor_prints_one_line_per_check(tmp_path):
    proc = widen("doctor", env_home=tmp_path / "runs")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) >= 6 and all(line.startswith("ok ") for line in lines)
    assert any("disk free" in line for line in lines)
