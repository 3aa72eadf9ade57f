import subprocess
import sys

from supervisor import main


def test_demo_shows_restarts(capsys):
    assert main(["--log-level", "CRITICAL", "demo", "--seconds", "0.6"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "the flaky worker was restarted" in out


def test_python_supervisor_py_is_the_same_program():
    r = subprocess.run([sys.executable, "supervisor.py", "--help"], capture_output=True, text=True, check=True)
    assert "demo" in r.stdout
