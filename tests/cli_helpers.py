"""Running the real `diffmine` command line in a subprocess, as a user would."""
import json
import subprocess
import sys


def diffmine_json(home, *args, timeout: float = 900) -> dict:
    """`diffmine ARGS --home HOME --json`: its JSON output; the test fails on a non-zero exit."""
    done = subprocess.run([sys.executable, "-m", "app.cli", *args, "--home", str(home), "--json"],
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)
