"""Running the real `diffmine` command line: in a subprocess, as a user would, or in the test's
own process (faster, and the test can patch what the command calls)."""
import json
import subprocess
import sys


def run_diffmine(home, *args, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """`diffmine ARGS --home HOME` in a subprocess; its exit code, stdout and stderr as text."""
    return subprocess.run([sys.executable, "-m", "app.cli", *args, "--home", str(home)],
                          capture_output=True, text=True, timeout=timeout, check=False, **kwargs)


def diffmine_json(home, *args, timeout: float = 900) -> dict:
    """`diffmine ARGS --home HOME --json` in a subprocess: its JSON output; the test fails on a
    non-zero exit."""
    done = run_diffmine(home, *args, "--json", timeout=timeout)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def diffmine_in_process(capsys, *argv, home, expect: int = 0) -> dict:
    """`diffmine ARGV --home HOME --json` run in this process (its output read through pytest's
    `capsys`): the JSON it printed, or {} when `expect` is a failure's exit code."""
    from app.cli import main

    capsys.readouterr()
    assert main([*argv, "--home", str(home), "--json"]) == expect, capsys.readouterr().err
    return json.loads(capsys.readouterr().out) if expect == 0 else {}
