"""Hypothesis settings shared by the property and fuzz tests: a fixed seed, so CI is repeatable."""

from hypothesis import HealthCheck, settings


def fixed_seed(n: int):
    """Derandomized, ``n`` examples, no deadline, no example database, no health checks on slow data."""
    return settings(
        derandomize=True,
        max_examples=n,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )
