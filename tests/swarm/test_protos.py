import subprocess
import sys

from tests.conftest import REPO


def test_generated_protobuf_modules_are_up_to_date():
    result = subprocess.run([sys.executable, str(REPO / "protos" / "generate.py"), "--check"], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr + result.stdout


def test_node_and_coordinator_never_import_each_other():
    for package, other in (("node", "coordinator"), ("coordinator", "node")):
        for source in (REPO / package).rglob("*.py"):
            text = source.read_text()
            assert f"from {other}" not in text and f"import {other}" not in text, source
