"""The promotion gate on the shipped cards: digits v2 passes, the sentiment v2s do not (and say why)."""

import subprocess
import sys

from testkit.gateway import ROOT
from serving.gate import check


def test_gate_checks_targets_and_the_stable_card():
    digits = check(ROOT / "models", "digits", 2, baseline=1)
    assert all(ok for _, ok, _ in digits)
    assert [name for name, _, _ in digits] == ["test accuracy >= 0.99", "test accuracy >= v1's 0.9888",
                                               "validation accuracy >= v1's 0.991"]
    lstm = {name: ok for name, ok, _ in check(ROOT / "models", "sentiment_lstm", 2, baseline=1)}
    assert lstm["whole-text test accuracy >= 0.87"] is False and lstm["test accuracy >= v1's 0.7708"] is True


def test_gate_exit_codes():
    run = lambda *a: subprocess.run([sys.executable, "-m", "serving.gate", *a], capture_output=True, text=True, cwd=ROOT)  # noqa: E731
    ok, bad = run("digits", "2"), run("sentiment_bilstm", "2")
    assert ok.returncode == 0 and "passes the promotion gate" in ok.stdout
    assert bad.returncode == 1 and "FAIL  sentiment_bilstm v2: whole-text test accuracy >= 0.87: 0.8592" in bad.stdout
