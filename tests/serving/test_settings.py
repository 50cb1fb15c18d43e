"""Settings: grouped, read from the same CLASSIFIER_* variables as before, with per-model
overrides of the limits and batching groups (model_settings) checked at start."""

import subprocess
import sys

import pytest
from pydantic import ValidationError

from serving.settings import Batching, Limits, Settings
from testkit.gateway import ROOT


def test_per_model_overrides_apply_to_that_model_only(monkeypatch):
    monkeypatch.setenv("CLASSIFIER_MODEL_SETTINGS", '{"sentiment_bilstm": {"max_batch_size": 64, "max_items_per_request": 8}}')
    monkeypatch.setenv("CLASSIFIER_MAX_QUEUE_ITEMS", "100")
    s = Settings(_env_file=None)
    assert (s.batching("sentiment_bilstm").max_batch_size, s.limits("sentiment_bilstm").max_items_per_request) == (64, 8)
    assert (s.batching("sentiment_lstm").max_batch_size, s.limits("sentiment_lstm").max_items_per_request) == (256, 1024)
    assert s.batching("sentiment_bilstm").max_queue_items == s.batching("digits").max_queue_items == 100  # global env
    assert s.batching("digits").max_concurrent_batches == 2  # 0 = by backend (embedded)
    assert Settings(_env_file=None, backend="tfserving").batching("digits").max_concurrent_batches == 4


@pytest.mark.parametrize("overrides, message", [
    ({"digits": {"rest_port": 1}}, "['rest_port'] cannot be set per model"),
    ({"digits": {"max_batch_size": 0}}, "model_settings['digits']: max_batch_size: Input should be greater than or equal to 1"),
])
def test_bad_model_settings_are_refused_at_start(overrides, message):
    with pytest.raises(ValidationError) as e:
        Settings(_env_file=None, model_settings=overrides)
    assert message in str(e.value)


def test_the_groups_hold_every_setting_once():
    groups = [cls for cls in Settings.__mro__[1:] if cls.__module__ == "serving.settings"]
    fields = [f for cls in groups for f in cls.__annotations__ if not f.startswith("_") and f != "model_config"]
    assert len(fields) == len(set(fields)) and set(fields) == set(Settings.model_fields)
    assert set(Limits.model_fields) < set(Settings.model_fields) and set(Batching.model_fields) < set(Settings.model_fields)


def test_a_gateway_with_a_bad_per_model_setting_does_not_start():
    env = {"CLASSIFIER_MODEL_SETTINGS": '{"digits": {"max_items_per_request": -1}}', "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "serving"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "model_settings" in r.stderr + r.stdout
