"""engine.train.fsdp under torchrun (2 CPU processes, gloo): sharding, tied blocks kept in the root's
unit, whole state and optimizer moments gathered and scattered back exactly. The full FSDP runs
(growth, resume, kill -9) are in test_distributed.py."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[3]


def test_sharding_gathering_and_optimizer_state_round_trip():
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(ROOT / "tests" / "fsdp_checks.py")], cwd=ROOT, capture_output=True, text=True,
                         timeout=240, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(re.findall(r"rank (\d): ok", out.stdout)) == ["0", "1"], out.stdout  # the ranks' lines may interleave
