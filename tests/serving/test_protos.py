"""Generated gRPC code must match protos/: regenerate and compare."""

import subprocess
import sys
from pathlib import Path

from serving.protogen import ROOT


def test_generated_code_is_up_to_date(tmp_path):
    # In a subprocess: protoc's C++ runtime and TensorFlow's crash when loaded together.
    subprocess.run([sys.executable, "-m", "serving.protogen", "--out", str(tmp_path)], cwd=ROOT, check=True,
                   capture_output=True)
    committed = ROOT / "serving" / "gen"
    fresh = {p.relative_to(tmp_path): p.read_text() for p in tmp_path.rglob("*") if p.is_file()}
    ours = {p.relative_to(committed): p.read_text() for p in committed.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert set(fresh) == set(ours), "files differ: run `python -m serving.protogen`"
    stale = [str(k) for k in fresh if fresh[k] != ours[k]]
    assert not stale, f"stale generated code {stale}: run `python -m serving.protogen`"


def test_generated_code_imports_without_sys_path_tricks():
    from serving.gen.classifier.v1 import classifier_pb2, classifier_pb2_grpc

    assert classifier_pb2.DESCRIPTOR.package == "classifier.v1"
    assert hasattr(classifier_pb2_grpc, "ClassifierStub")
    assert Path(classifier_pb2.__file__).parent == ROOT / "serving" / "gen" / "classifier" / "v1"
