import os
import sys

import pytest

from tiny_models import scheduler, tiny_unet


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A save_pretrained directory (tiny UNet + DDIM scheduler config) for commands that take --model."""
    path = tmp_path_factory.mktemp("tiny_model")
    tiny_unet().save_pretrained(path)
    scheduler().save_pretrained(path)
    return path


def pytest_runtest_logreport(report):
    # benchmarks/gpu_suite.sh sets this: on a short GPU lease a run may be stopped before pytest's summary, so each
    # failure's traceback is written as soon as it happens.
    if report.failed and os.environ.get("MSFP_TRACEBACKS_AT_ONCE"):
        sys.stderr.write(f"\n---- FAILED {report.nodeid} ({report.when})\n{report.longreprtext}\n")
