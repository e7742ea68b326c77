"""Run a snippet under several string-hash seeds: a key that follows set or dict-of-set order differs between them."""

import os
import subprocess
import sys


def outputs_under_hash_seeds(code: str, seeds=(1, 2, 3)) -> set[str]:
    """What ``code`` prints in fresh interpreters (with the tests folder importable), one per ``PYTHONHASHSEED``."""
    tests = os.path.dirname(__file__)
    return {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tests,
                           env={**os.environ, "PYTHONHASHSEED": str(seed), "PYTHONPATH": tests}).stdout
            for seed in seeds}
