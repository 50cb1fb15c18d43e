"""The README's curl examples run as shown (issue 25): every ``curl`` command against
``localhost:8000`` in its ``sh`` blocks is run against a real gateway (the address swapped for the
test gateway's) and must answer 2xx."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from testkit.gateway import ROOT

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


def readme_curls() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)  # continuation lines
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith("#") or "kubectl" in line:
                continue
            commands += [c.strip() for c in line.split(";") if c.strip().startswith("curl ") and "localhost:8000" in c]
    return commands


def test_the_readme_has_curl_examples():
    assert len(readme_curls()) >= 5, readme_curls()


@pytest.mark.parametrize("command", readme_curls())
def test_readme_curl_example_answers_2xx(gw, command):
    address = gw.rest.removeprefix("http://")
    # --fail: exit 22 on a status >= 400; the status is printed last
    run = command.replace("localhost:8000", address).replace("curl ", "curl --fail -w '\\n%{http_code}' ", 1)
    r = subprocess.run(["bash", "-c", run], capture_output=True, text=True, timeout=60)
    status = r.stdout.rsplit("\n", 1)[-1]
    assert r.returncode == 0 and status.startswith("2"), f"{command}\n-> exit {r.returncode}, {status}: {r.stdout[-500:]}"
