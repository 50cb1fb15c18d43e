"""Live gateways for the checks of the deployment's metric names (test_alerts.py, test_grafana.py)."""

import pytest

from testkit.gateway import gateway_processes


@pytest.fixture(scope="session")
def fresh_gateways():
    """Two gateways with the default settings, started together (their start-ups overlap), one per
    module, so that each sees a gateway nothing else has sent anything to: "alerts" (test_alerts.py
    reads its /metrics), "grafana" (test_grafana.py sends one sentiment and one digits request first)."""
    with gateway_processes({}, {}) as (alerts, grafana):
        yield {"alerts": alerts, "grafana": grafana}
