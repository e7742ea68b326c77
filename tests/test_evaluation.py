import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler

from msfp.calibration import Trajectories
from msfp.evaluation import eps_mse_means, eps_mse_weighted, load_image_dir, load_reference, per_timestep_eps_mse, psnr
from msfp.samples import save_samples
from msfp.losses import denoising_factors


def ddim():
    return DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")


@pytest.mark.parametrize("scheduler", [ddim(), EulerDiscreteScheduler(num_train_timesteps=1000)])
def test_eps_mse_weighted_is_the_gamma_squared_weighted_mean(scheduler):
    timesteps, gammas = denoising_factors(scheduler, 10)
    timesteps = [int(t) for t in timesteps.tolist()]
    # A uniform error is unchanged (weights have mean 1).
    assert eps_mse_weighted({t: 0.25 for t in timesteps}, scheduler) == pytest.approx(0.25)
    # An error at one step counts with that step's share of sum γ².
    g2 = [g * g for g in gammas.tolist()]
    for k in (0, len(timesteps) - 1):
        one = {t: (1.0 if i == k else 0.0) for i, t in enumerate(timesteps)}
        assert eps_mse_weighted(one, scheduler) == pytest.approx(g2[k] / sum(g2), rel=1e-6)


def test_last_ddim_step_hardly_counts():
    # The plain mean is dominated by t = 0, where the ε error barely moves the sample (γ_0 is tiny).
    sched = ddim()
    timesteps = [int(t) for t in denoising_factors(sched, 20)[0].tolist()]
    errors = {t: (0.4 if t == 0 else 0.002) for t in timesteps}
    plain = sum(errors.values()) / len(errors)
    assert eps_mse_weighted(errors, sched) < 0.2 * plain


def test_eps_mse_means_name_the_timesteps_where_the_error_is_not_finite():
    errors = {t: 0.25 for t in range(900, -1, -100)}
    assert eps_mse_means(errors, ddim()) == (pytest.approx(0.25), pytest.approx(0.25), None)
    errors.update({300: float("nan"), 0: float("inf")})  # a NaN mean went to JSON as null: "not applicable"
    mean, weighted, why_not = eps_mse_means(errors, ddim())
    assert mean is weighted is None and why_not.startswith("the noise prediction error is not finite at t = 300, 0:")


def test_eps_mse_weighted_takes_fractional_and_json_keys():
    euler = EulerDiscreteScheduler(num_train_timesteps=1000, use_karras_sigmas=True)
    timesteps = denoising_factors(euler, 4)[0].tolist()
    assert any(t != int(t) for t in timesteps)  # used to be truncated, and then not found on the trajectory
    assert eps_mse_weighted({t: 0.25 for t in timesteps}, euler) == pytest.approx(0.25)
    assert eps_mse_weighted({str(t): 0.25 for t in range(900, -1, -100)}, ddim()) == \
        pytest.approx(0.25)  # keys as results.json gives them back


def test_per_timestep_eps_mse_by_hand():
    # Points at t = 10 (two) and t = 900 (one); the model halves its input, so its error is (x / 2 - eps)².
    x = torch.tensor([[2.0, 2.0], [0.0, 4.0], [6.0, 0.0]]).view(3, 2, 1, 1)
    eps = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]]).view(3, 2, 1, 1)
    points = Trajectories(x, torch.tensor([10, 900, 10]), eps, {})
    model = torch.nn.Module()
    model.forward = lambda sample, timestep: sample / 2
    by_t = per_timestep_eps_mse(model, points, device="cpu", batch_size=2)
    # t = 10: errors (0 + 1) / 2 and (9 + 0) / 2, mean 2.5; t = 900: (1 + 1) / 2. Largest timestep first.
    assert list(by_t.items()) == [(900, 1.0), (10, 2.5)]
    with pytest.raises(ValueError, match="no ε MSE values to weight"):  # was a ZeroDivisionError
        eps_mse_weighted({}, ddim())


def test_psnr_pairs_equally_shaped_sets():
    a = np.zeros((2, 4, 4, 1), np.uint8)
    b = a.copy()
    b[1, 0, 0, 0] = 255  # one pixel of 32 off by 255: MSE 255² / 32
    assert psnr(a, b) == pytest.approx((10 * np.log10(32), 255 ** 2 / 32))
    # 2 images against 1 broadcast silently, and empty sets gave (inf, nan).
    for x, y in ((a[:1], a), (a[:0], a[:0])):
        with pytest.raises(ValueError, match="PSNR pairs the images of two equally shaped, non-empty sets"):
            psnr(x, y)


def test_psnr_sums_in_chunks_of_integers(monkeypatch):
    import tracemalloc

    import msfp.evaluation

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (16, 64, 64, 3), dtype=np.uint8)
    b = a ^ rng.integers(0, 4, a.shape, dtype=np.uint8)
    b[0] = 255 - a[0]  # large errors too
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    monkeypatch.setattr(msfp.evaluation, "PSNR_CHUNK_PIXELS", 4096, raising=False)
    tracemalloc.start()
    try:
        result = psnr(a, b)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result == (10 * np.log10(255 ** 2 / mse), mse)  # exactly: the sum of squares is a whole number
    assert peak < a.nbytes / 2  # float64 copies of both sets, their difference and its square took ~24x a.nbytes
    with pytest.raises(ValueError, match="PSNR takes uint8 images"):  # a cast to integers would truncate them
        psnr(a / 255, b / 255)


def test_eps_mse_weighted_rejects_other_timesteps():
    with pytest.raises(ValueError, match="not the 3-step trajectory of DDIMScheduler"):
        eps_mse_weighted({999: 0.1, 500: 0.1, 1: 0.1}, ddim())
    # Heun evaluates each timestep twice: its own points were "not the 5-step trajectory" of it.
    heun = HeunDiscreteScheduler(num_train_timesteps=1000)
    timesteps, _ = denoising_factors(heun, 5)
    with pytest.raises(ValueError, match="HeunDiscreteScheduler visits timesteps more than once, so a timestep has no "
                                         "single denoising factor"):
        eps_mse_weighted({t: 0.1 for t in timesteps.tolist()}, heun)


def test_reference_images_of_other_modes_keep_their_values(tmp_path):
    from PIL import Image

    ramp = np.arange(256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(ramp.astype(np.uint16) * 257).save(tmp_path / "a_16bit.png")  # convert("L") clipped it to 0/255
    Image.fromarray(ramp).convert("LA").save(tmp_path / "b_alpha.png")  # read as RGB: 3 channels
    Image.fromarray(ramp).save(tmp_path / "c_8bit.png")
    Image.fromarray(ramp).convert("P").save(tmp_path / "d_gray_palette.png")  # read as RGB: 3 channels
    images = load_image_dir(tmp_path)
    assert images.shape == (4, 16, 16, 1) and all((im[..., 0] == ramp).all() for im in images)
    (tmp_path / "rgb").mkdir()
    color = np.stack([ramp, ramp[::-1], ramp.T], axis=-1)
    Image.fromarray(color).convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "rgb" / "a.png")
    assert load_image_dir(tmp_path / "rgb").shape == (1, 16, 16, 3)  # a palette of colours stays RGB


def test_reference_image_directories_skip_hidden_files_and_name_a_damaged_one(tmp_path):
    from PIL import Image

    noise = np.random.default_rng(0).integers(0, 256, (16, 16), dtype=np.uint8)  # incompressible: a real IDAT
    for i in range(4):
        Image.fromarray(noise).save(tmp_path / f"{i}.png")
    (tmp_path / "._0.png").write_bytes(b"\x00\x05\x16\x07 macOS metadata")  # used to fail the whole load
    (tmp_path / "dir.png").mkdir()  # used to be an IsADirectoryError
    assert load_image_dir(tmp_path).shape == (4, 16, 16, 1)
    (tmp_path / "3.png").write_bytes((tmp_path / "3.png").read_bytes()[:150])
    with pytest.raises(ValueError, match=r"3\.png: not a readable image"):  # it used to name no file
        load_image_dir(tmp_path)


def test_a_reference_too_small_for_the_distribution_metrics_skips_them(tmp_path):
    from pathlib import Path

    from msfp.evaluation import evaluate

    with np.load(Path(__file__).parent / "data" / "fashion_mnist_test256.npz") as f:
        images = np.pad(f["images"][:16], ((0, 0), (2, 2), (2, 2)))[..., None]
    save_samples(tmp_path / "s.npz", images[:12], np.arange(12))
    save_samples(tmp_path / "ref.npz", images[12:15], np.arange(3))
    # It used to fail in KID (or precision/recall), losing the metrics that need no reference images.
    result = evaluate(tmp_path / "s.npz", load_reference(ref=tmp_path / "ref.npz"))
    assert "classifier_score" in result["metrics"] and "fd" not in result["metrics"]
    assert result["skipped"]["fd, kid, precision, recall"] == "they need at least 4 reference images, got 3"


def test_classifier_score_splits_hold_ten_images_or_more():
    from msfp.evaluation import _splits
    from msfp.metrics import classifier_score

    assert [_splits(n) for n in (1, 10, 19, 40, 160, 5000)] == [1, 1, 1, 4, 10, 10]
    ten_classes = np.full((10, 10), -np.inf)
    np.fill_diagonal(ten_classes, 0.0)  # ten images, ten confident classes
    assert classifier_score(ten_classes, 10)[0] == 1.0  # one image per split: 1 whatever the images
    assert classifier_score(ten_classes, _splits(10)) == (pytest.approx(10.0), None)  # one split: no spread


def test_a_data_dir_reference_is_its_own_images_fd_included(tmp_path):
    from idx_files import SAMPLE, idx_bytes

    from msfp.evaluation import Reference, evaluate

    # Another data set under Fashion-MNIST's file names (as MNIST has): FD used the shipped statistics of the
    # 10,000 Fashion-MNIST test images while KID used these 256, all under the name of the former.
    with np.load(SAMPLE) as f:
        images, labels = f["images"], f["labels"]
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(255 - images))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    reference = load_reference(data_dir=tmp_path)
    assert reference.name == f"{tmp_path} test split (256 images)" and reference.stats is None
    save_samples(tmp_path / "s.npz", np.pad(images[:20], ((0, 0), (2, 2), (2, 2)))[..., None], np.arange(20))
    result = evaluate(tmp_path / "s.npz", reference, device="cpu")
    images_only = evaluate(tmp_path / "s.npz", Reference("images", images=reference.images), device="cpu")
    assert result["reference"] == reference.name and result["metrics"]["fd"] == images_only["metrics"]["fd"]


class RandomInception(torch.nn.Module):
    """Inception's outputs for uint8 (N, 1 or 3, H, W) images, without torch-fidelity or its weights."""

    def __init__(self, weights_path):
        super().__init__()

    def forward(self, images):
        assert images.dtype == torch.uint8 and images.shape[1] in (1, 3)
        return {k: torch.rand(len(images), 8) for k in ("pool", "spatial", "logits")}


def test_inception_metrics_refuse_a_reference_of_another_size_as_the_feature_nets_do(tmp_path, monkeypatch):
    import msfp.inception
    from msfp.evaluation import Reference, evaluate

    monkeypatch.setattr(msfp.inception, "InceptionFeatures", RandomInception)
    rng = np.random.default_rng(0)
    save_samples(tmp_path / "rgb.npz", rng.integers(0, 256, (12, 64, 64, 3), dtype=np.uint8), np.arange(12))
    gray_28 = Reference("gray28", images=rng.integers(0, 256, (12, 28, 28, 1), dtype=np.uint8))
    # FID, sFID and precision/recall were computed against it (Inception resizes any image to 299x299).
    with pytest.raises(ValueError, match=r"images \(gray28\) are \(28, 28, 1\) but samples are \(64, 64, 3\)"):
        evaluate(tmp_path / "rgb.npz", gray_28, inception_weights="weights.pth", device="cpu")
    assert "fid" in evaluate(tmp_path / "rgb.npz", Reference("rgb64", images=rng.integers(
        0, 256, (12, 64, 64, 3), dtype=np.uint8)), inception_weights="weights.pth", device="cpu")["metrics"]
    # Without Inception nothing uses it: the feature network takes 32x32x1 images only.
    assert "fd" not in evaluate(tmp_path / "rgb.npz", gray_28, device="cpu")["metrics"]


def test_gray_images_stored_as_rgb_are_one_channel_and_still_fit_rgb_samples(tmp_path, monkeypatch):
    from PIL import Image

    import msfp.inception
    from msfp.evaluation import Reference, check_reference, evaluate

    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (4, 32, 32), dtype=np.uint8)
    (tmp_path / "gray").mkdir()
    for i, im in enumerate(gray):  # as torchvision.utils.save_image writes 1-channel tensors
        Image.fromarray(np.stack([im] * 3, -1)).save(tmp_path / "gray" / f"{i}.png")
    loaded = load_image_dir(tmp_path / "gray")  # was (4, 32, 32, 3): refused against 1-channel samples
    assert loaded.shape == (4, 32, 32, 1) and (loaded[..., 0] == gray).all()
    check_reference(Reference("gray", images=loaded), (32, 32, 1))
    # One colour image among them: the set stays RGB.
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "gray" / "9.png")
    assert load_image_dir(tmp_path / "gray").shape == (5, 32, 32, 3)
    # A gray set against RGB samples (Inception only) is compared, as it was when it loaded with three channels; a
    # colour set against gray samples is refused.
    monkeypatch.setattr(msfp.inception, "InceptionFeatures", RandomInception)
    save_samples(tmp_path / "rgb.npz", rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), np.arange(8))
    result = evaluate(tmp_path / "rgb.npz", Reference("gray", images=loaded), inception_weights="w.pth", device="cpu")
    assert "fid" in result["metrics"]
    with pytest.raises(ValueError, match=r"reference images \(rgb\) are \(32, 32, 3\) but samples are \(32, 32, 1\)"):
        check_reference(Reference("rgb", images=np.zeros((4, 32, 32, 3), np.uint8)), (32, 32, 1), inception=True)
