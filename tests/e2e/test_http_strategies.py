"""`python -m benchmarks.http_load --strategies`: the per-strategy latency table of docs/performance.md (issue 21)
comes from a real server that ranked every request by the strategy it asked for, 1 user and 64 a request.
No timing is asserted: the figures are the benchmark's output, not a test's."""
import json
import os
import subprocess
import sys

import pytest

from benchmarks.http_load import main
from conftest import REPO, small_checkpoint, staged_checkpoint


@pytest.mark.slow
def test_every_strategy_and_request_size_is_measured_through_http(tmp_path):
    checkpoint = staged_checkpoint(tmp_path / "model.ckpt", n_users=90, n_items=200, seed=3)
    out = tmp_path / "strategies.json"
    run = subprocess.run([sys.executable, "-m", "benchmarks.http_load", "--strategies", "--checkpoint", checkpoint,
                          "--rounds", "1", "--duration", "0.1", "--warmup", "0", "--workdir", str(tmp_path),
                          "--json", str(out)], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(out.read_text())
    # a row per (users a request, strategy); an answer not ranked by the strategy asked for counts as an error
    assert {(r["users"], r["strategy"]) for r in result["rows"]} == {
        (n, s) for n in (1, 64) for s in ("full", "two_stage", "retrieval")}
    assert all(r["requests"] >= 3 and r["errors"] == 0 for r in result["rows"])
    assert result["stage"]["strategy"] in ("two_stage", "retrieval")
    assert result["bytes"] == os.path.getsize(checkpoint)
    assert "two_stage" in run.stdout and "full/p50" in run.stdout


def test_a_missing_checkpoint_or_strategy_is_an_error_not_a_traceback(tmp_path, capsys):
    assert main(["--strategies", "--checkpoint", str(tmp_path / "absent.ckpt"), "--workdir", str(tmp_path)]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--strategies", "--checkpoint", str(tmp_path / "absent.ckpt"), "--users", "1,1000"])
    assert "from 1 to 256" in capsys.readouterr().err
    without_stage = small_checkpoint(tmp_path / "cmn-only.ckpt")
    assert main(["--strategies", "--checkpoint", without_stage, "--only", "two_stage", "--workdir", str(tmp_path)]) == 2
    assert "does not offer ['two_stage'] (it offers ['full'])" in capsys.readouterr().err
    assert main(["--strategies", "--checkpoint", without_stage, "--workdir", str(tmp_path)]) == 2
    assert "64 users a request, but" in capsys.readouterr().err
