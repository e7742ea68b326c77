import os
import sys

import pytest
import torch

from tiny_models import scheduler, tiny_unet


@pytest.fixture(autouse=True)
def _keep_torch_thread_count():
    # Benchmarks run in-process set torch's thread count; tests after them would otherwise run with theirs, and sums
    # in another order move fine-tuning results by more than ulps.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


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
