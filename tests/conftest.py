import pytest

from tiny_models import scheduler, tiny_unet


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A save_pretrained directory (tiny UNet + DDIM scheduler config) for commands that take --model."""
    path = tmp_path_factory.mktemp("tiny_model")
    tiny_unet().save_pretrained(path)
    scheduler().save_pretrained(path)
    return path
