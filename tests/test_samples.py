import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from diffusers import DiTTransformer2DModel

from msfp.sampling import NonFiniteSamplesWarning
from msfp.samples import (SCHEDULERS, Guided, NonFiniteSamplesError, _rank_device, _require_finite, from_uint8,
                          generate, get_scheduler, grid_path, load_samples, sample_labels, save_samples, to_uint8)
from tiny_models import scheduler, tiny_class_unet, tiny_dit, tiny_plain, tiny_unet


def test_uint8_round_trip():
    u8 = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    x = from_uint8(u8)
    assert x.shape == (1, 1, 16, 16) and x.min() == -1 and x.max() == 1
    np.testing.assert_array_equal(to_uint8(x), u8)
    np.testing.assert_array_equal(to_uint8(torch.tensor([-3.0, -1.0, 0.0, 1.0, 5.0]).view(1, 1, 1, 5)).ravel(),
                                  [0, 0, 128, 255, 255])  # clamped, and 127.5 rounds half to even


def test_save_load_and_bad_files(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    save_samples(tmp_path / "s.npz", images, [5, 6, 7, 8], labels=[0, 1, 2, 0], meta=dict(model="x"))
    s = load_samples(tmp_path / "s.npz")
    np.testing.assert_array_equal(s["images"], images)
    assert s["seeds"].tolist() == [5, 6, 7, 8] and s["labels"].tolist() == [0, 1, 2, 0] and s["meta"] == {"model": "x"}
    assert [p.name for p in tmp_path.iterdir()] == ["s.npz"]  # no temporary file left behind

    with pytest.raises(FileNotFoundError, match="missing.npz not found"):
        load_samples(tmp_path / "missing.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(ValueError, match=r"text.npz: not a .npz sample file \(not a zip archive\)"):
        load_samples(tmp_path / "text.npz")
    np.savez(tmp_path / "float.npz", arr_0=images.astype(np.float32))
    with pytest.raises(ValueError, match=r"expected arr_0 = uint8 images.*float32 \(4, 8, 8, 3\)"):
        load_samples(tmp_path / "float.npz")
    np.savez(tmp_path / "other.npz", x=images)
    with pytest.raises(ValueError, match=r"got keys \['x'\]"):
        load_samples(tmp_path / "other.npz")
    np.savez(tmp_path / "seeds.npz", arr_0=images, seeds=np.arange(3))
    with pytest.raises(ValueError, match=r"seeds has shape \(3,\), expected \(4,\)"):
        load_samples(tmp_path / "seeds.npz")
    np.savez(tmp_path / "meta.npz", arr_0=images, seeds=np.arange(4), meta=np.array('"beta"'))
    with pytest.raises(ValueError, match="meta is JSON str, expected an object"):  # was a TypeError in eval --paired
        load_samples(tmp_path / "meta.npz")

    # Writing checks as much as reading: a cast to uint8 would turn floats in [-1, 1] into 0s and 1s.
    with pytest.raises(ValueError, match=r"expected arr_0 = uint8 images.*got float32 \(4, 8, 8, 3\)"):
        save_samples(tmp_path / "f.npz", images.astype(np.float32) / 127.5 - 1, [5, 6, 7, 8])
    with pytest.raises(ValueError, match=r"labels has shape \(3,\), expected \(4,\)"):
        save_samples(tmp_path / "l.npz", images, [5, 6, 7, 8], labels=[0, 1, 2])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["float.npz", "meta.npz", "other.npz", "s.npz", "seeds.npz",
                                                          "text.npz"]


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_scheduler_is_batch_size_invariant(tmp_path, name):
    model, sched = tiny_unet(), get_scheduler(name, scheduler())
    a = generate(model, sched, tmp_path / "a.npz", 3, 2, seed=4, batch_size=3, disable=True)
    b = generate(model, sched, tmp_path / "b.npz", 3, 2, seed=4, batch_size=2, disable=True)
    # uint8 rounding absorbs the float noise of different batch sizes (sampling.py tests the floats).
    assert np.abs(a["images"].astype(int) - b["images"]).max() <= 1
    assert a["seeds"].tolist() == [4, 5, 6] and a["labels"] is None
    assert a["meta"]["scheduler"] == type(sched).__name__ and a["meta"]["steps"] == 2
    assert grid_path(tmp_path / "a.npz").is_file()


def test_generate_keeps_images_as_uint8_batch_by_batch(tmp_path, monkeypatch):
    # Every image used to be held in float32 and copied several times over: about 12x the uint8 file at the peak.
    import msfp.samples

    model, sched = tiny_unet(), scheduler()
    sizes = []
    floats = msfp.samples.sample(model, sched, 5, 2, seed=1, batch_size=2, disable=True,
                                 postprocess=lambda x: sizes.append(len(x)) or x)
    assert sizes == [2, 2, 1]
    returned = []

    def recording_sample(*args, **kwargs):
        returned.append(msfp.sampling.sample(*args, **kwargs))
        return returned[-1]

    monkeypatch.setattr(msfp.samples, "sample", recording_sample)
    result = generate(model, sched, tmp_path / "g.npz", 5, 2, seed=1, batch_size=2, disable=True)
    assert returned[0].dtype == torch.uint8
    np.testing.assert_array_equal(result["images"], to_uint8(floats))


def test_unknown_scheduler():
    with pytest.raises(ValueError, match="unknown scheduler 'heun'; choose from ddim, ddpm"):
        get_scheduler("heun", scheduler())


def test_class_labels_come_from_each_images_own_seed(tmp_path):
    assert sample_labels(3, [9, 10, 11]).tolist() == sample_labels(3, range(7, 13))[2:5].tolist()
    s = generate(tiny_class_unet(), scheduler(), tmp_path / "c.npz", 6, 2, seed=7, disable=True)
    assert s["labels"].tolist() == sample_labels(3, range(7, 13)).tolist()
    assert set(s["labels"].tolist()) == {0, 1, 2}
    # Redrawing image 2 with its own seed gives the same label, so the same image.
    one = generate(tiny_class_unet(), scheduler(), tmp_path / "one.npz", 1, 2, seed=9, disable=True)
    assert one["labels"].tolist() == s["labels"][2:3].tolist()
    assert np.abs(one["images"].astype(int) - s["images"][2:3]).max() <= 1
    # Any seed works, as for unconditional models: numpy's seed sequences used to refuse a negative one.
    negative = generate(tiny_class_unet(), scheduler(), tmp_path / "n.npz", 3, 2, seed=-3, disable=True)
    assert negative["labels"].tolist() == sample_labels(3, [-3, -2, -1]).tolist()


def test_guidance(tmp_path):
    class Echo(torch.nn.Module):  # "prediction" = class label, so guidance is plain arithmetic
        def forward(self, x, t, class_labels):
            return class_labels.float().view(-1, 1, 1, 1).expand_as(x)

    out = Guided(Echo(), 3.0, null_label=10)(torch.zeros(2, 1, 2, 2), torch.zeros(2), torch.tensor([4, 6]))
    torch.testing.assert_close(out[:, 0, 0, 0], torch.tensor([10 + 3.0 * (4 - 10), 10 + 3.0 * (6 - 10)]))
    # With a learned variance (a second set of channels), only the noise is guided; the variance is the conditional
    # branch's (it was extrapolated too, past the range a learned-range DDPM step interpolates in).
    wide = Guided(lambda x, t, class_labels: torch.cat([Echo()(x, t, class_labels)] * 2, 1), 3.0, null_label=10)
    out = wide(torch.zeros(2, 1, 2, 2), torch.zeros(2), torch.tensor([4, 6]))
    torch.testing.assert_close(out[:, :, 0, 0], torch.tensor([[-8.0, 4.0], [-2.0, 6.0]]))

    torch.manual_seed(0)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=1, out_channels=2,
                                num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=5).eval()
    s = generate(dit, scheduler(), tmp_path / "dit.npz", 2, 2, guidance=4.0, disable=True)
    assert s["images"].shape == (2, 8, 8, 1) and s["meta"]["guidance"] == 4.0 and s["labels"].max() < 5
    with pytest.raises(ValueError, match="4-channel outputs.*1 or 3"):
        generate(tiny_dit(), scheduler(), tmp_path / "latent.npz", 2, 2, disable=True)
    with pytest.raises(ValueError, match="guidance 2.0 needs a class-conditional model with a null class"):
        generate(tiny_unet(), scheduler(), tmp_path / "u.npz", 2, 2, guidance=2.0, disable=True)
    # inf wrote clipped, meaningless images with "guidance": Infinity in their metadata; NaN read as a diverged model.
    for bad in (float("inf"), float("nan"), -3.0):
        with pytest.raises(ValueError, match=rf"guidance must be a finite number ≥ 0 \(1: no guidance\), got {bad}"):
            generate(dit, scheduler(), tmp_path / "bad.npz", 2, 2, guidance=bad, disable=True)
    assert not (tmp_path / "bad.npz").exists()


def test_torchrun_shards_equal_a_single_process(tmp_path, tiny_model_dir):
    single = generate(tiny_unet(), scheduler(), tmp_path / "single.npz", 5, 2, seed=3, batch_size=2, disable=True)
    out = tmp_path / "sharded.npz"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "msfp.cli",
           "sample", "--model", str(tiny_model_dir), "-n", "5", "--steps", "2", "--seed", "3", "--batch", "2",
           "--device", "cpu", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sharded = load_samples(out)
    np.testing.assert_array_equal(sharded["images"], single["images"])
    assert sharded["seeds"].tolist() == [3, 4, 5, 6, 7] and sharded["meta"]["world_size"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sharded.npz", "sharded.png", "single.npz", "single.png"]
    assert sharded["meta"]["model"] == str(tiny_model_dir)


def test_a_merged_sample_file_records_each_ranks_settings_where_they_differ():
    from msfp.samples import _merge_meta

    # 9 images on 2 GPUs at --batch 64: rank 0 drew 4 per call on cuda:0, rank 1 5 on cuda:1. The merged file
    # recorded rank 0's (4, cuda:0) for all 9.
    metas = [dict(model="m", world_size=2, batch_size=4, device="cuda:0", cuda_graphs=False, sample_time_s=3.0),
             dict(model="m", world_size=2, batch_size=5, device="cuda:1", cuda_graphs=False, sample_time_s=4.5)]
    setup = dict(batch_size=4, device="cuda:0", cuda_graphs=False)  # rank 0's
    assert _merge_meta(metas, setup) == dict(model="m", world_size=2, batch_size=[4, 5], device=["cuda:0", "cuda:1"],
                                             cuda_graphs=False, sample_time_s=4.5)
    metas[1].update(batch_size=4, device="cuda:0")  # the same settings on every rank: one value, as unsharded
    assert _merge_meta(metas, setup) == dict(metas[0], sample_time_s=4.5)


def test_each_rank_samples_on_its_own_gpu(monkeypatch):
    # --device cuda under torchrun put every rank on the current device, GPU 0.
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert _rank_device("cuda", 3, 4) == torch.device("cuda", 3)
    assert _rank_device("cuda:1", 3, 4) == torch.device("cuda", 1)  # an explicit index is the user's choice
    assert _rank_device("cpu", 3, 4) == torch.device("cpu")
    assert _rank_device("cuda", 0, 1) == "cuda"  # one process: as given
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _rank_device(None, 3, 4) == torch.device("cuda", 3)


def test_diverged_images_are_refused_not_written_black(tmp_path):
    model = tiny_unet()
    calls = []

    def first_call_nan_where_noise_is_high(x, t):
        calls.append(1)  # NaN only at the first step, for the images whose first noise pixel exceeds 1
        eps = model(x, t).sample
        return eps if len(calls) > 1 else torch.where(x[:, :1, :1, :1] > 1, float("nan"), eps)

    net = torch.nn.Module()
    net.forward = first_call_nan_where_noise_is_high
    net.config = model.config
    noise = [torch.randn((1, 8, 8), generator=torch.Generator().manual_seed(i))[0, 0, 0] for i in range(8)]
    high = [i for i, v in enumerate(noise) if v > 1]
    assert 0 < len(high) < 8  # this seed range has both kinds

    out = tmp_path / "s.npz"
    save_samples(out, np.zeros((1, 8, 8, 1), np.uint8), [0])  # an earlier result
    before = out.read_bytes()
    with pytest.raises(NonFiniteSamplesError, match=rf"^{len(high)} of 8 images have NaN or inf pixels \(seed "
                                                    rf"{high[0]} among them\).*DDIMScheduler, 2 steps.*not written"):
        with warnings.catch_warnings():
            warnings.simplefilter("error", NonFiniteSamplesWarning)  # the sampler's warning: said once, not twice
            generate(net, scheduler(), out, 8, 2, batch_size=8, disable=True)
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["s.npz"]


def test_generate_replaces_only_an_earlier_sample_file(tmp_path):
    # Any .npz was replaced, e.g. reference statistics given as --out by mistake.
    stats = tmp_path / "ref.npz"
    np.savez(stats, mu=np.zeros(4), sigma=np.eye(4))
    unseeded = tmp_path / "unseeded.npz"
    np.savez(unseeded, arr_0=np.zeros((2, 8, 8, 1), np.uint8))
    text = tmp_path / "notes.npz"
    text.write_text("not an archive")
    for path, held in ((stats, r"\['mu', 'sigma'\]"), (unseeded, r"\['arr_0'\]"),
                       (text, r"nothing readable as .npz \(\w+\)")):
        before = path.read_bytes()
        for named in (path, tmp_path / "missing" / ".." / path.name):  # the second passed: no such file, yet
            with pytest.raises(ValueError, match=f"{path.name} exists and holds {held}, not the images and seeds "
                                                 "msfp sample writes; it is not a sample file to replace"):
                generate(tiny_unet(), scheduler(), named, 2, 1, disable=True)
        assert path.read_bytes() == before
    (tmp_path / "dir.npz").mkdir()
    with pytest.raises(ValueError, match="dir.npz is a directory; name the sample file"):  # said "not found; exists"
        generate(tiny_unet(), scheduler(), tmp_path / "dir.npz", 2, 1, disable=True)
    (tmp_path / "store").mkdir()
    link = tmp_path / "linked.npz"
    link.symlink_to(tmp_path / "store" / "run1.npz")
    generate(tiny_unet(), scheduler(), link, 2, 1, disable=True)  # the link is the name: its grid beside it
    assert link.is_symlink() and (tmp_path / "store" / "run1.npz").is_file() and grid_path(link).is_file()
    earlier = tmp_path / "s.npz"
    generate(tiny_unet(), scheduler(), earlier, 2, 1, seed=0, disable=True)
    assert generate(tiny_unet(), scheduler(), earlier, 3, 1, seed=5, disable=True)["seeds"].tolist() == [5, 6, 7]


def test_generate_checks_the_grid_path_before_sampling(tmp_path):
    # A directory at the grid's path: the samples were drawn and the earlier sample file replaced, then the grid
    # failed. A file that is no PNG (notes.png beside notes.npz) was replaced without a word.
    earlier = tmp_path / "g.npz"
    generate(tiny_unet(), scheduler(), earlier, 2, 1, disable=True)
    grid_path(earlier).unlink()
    grid_path(earlier).mkdir()
    before = earlier.read_bytes()
    with pytest.raises(ValueError, match="g.png is a directory; the PNG grid of g.npz is written there"):
        generate(tiny_unet(), scheduler(), earlier, 3, 1, seed=5, disable=True)
    assert earlier.read_bytes() == before
    notes = tmp_path / "h.png"
    notes.write_text("my notes")
    with pytest.raises(ValueError, match="h.png exists and is not a PNG image; the PNG grid of h.npz would replace"):
        generate(tiny_unet(), scheduler(), tmp_path / "h.npz", 2, 1, disable=True)
    assert notes.read_text() == "my notes" and not (tmp_path / "h.npz").exists()
    # An earlier grid (a PNG) is replaced, as the sample file is.
    again = tmp_path / "s.npz"
    generate(tiny_unet(), scheduler(), again, 2, 1, disable=True)
    first = grid_path(again).read_bytes()
    generate(tiny_unet(), scheduler(), again, 3, 1, seed=5, disable=True)
    assert grid_path(again).read_bytes() != first


def _require_finite_on_rank(rank, init_file, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    images = torch.zeros(2, 1, 4, 4)
    if rank == 1:
        images[1, 0, 2, 3] = float("inf")
    try:
        _require_finite((~images.isfinite()).flatten(1).any(1), first_seed=10 + 2 * rank, num_samples=4, world=2,
                        context="test")
        results[rank] = "passed"
    except NonFiniteSamplesError as e:
        results[rank] = str(e)
    finally:
        dist.destroy_process_group()


def test_every_rank_refuses_when_one_rank_diverged(tmp_path):
    # Rank 0's images are fine, yet it must raise too: alone, rank 1 raising would leave rank 0 at a barrier.
    with torch.multiprocessing.Manager() as manager:
        results = manager.dict()
        torch.multiprocessing.spawn(_require_finite_on_rank, args=(str(tmp_path / "init"), results), nprocs=2)
        results = dict(results)
    assert results[0].startswith("1 of 4 images have NaN or inf pixels: the model")
    assert results[1].startswith("1 of 4 images have NaN or inf pixels (seed 13 among them)")


def test_generate_samples_a_plain_model_given_its_sample_shape(tmp_path):
    # Its error said "pass sample_shape=(C, H, W)", which generate did not take.
    with pytest.raises(ValueError, match=r"pass sample_shape=\(C, H, W\)"):
        generate(tiny_plain(), scheduler(), tmp_path / "p.npz", 2, 2, disable=True)
    assert generate(tiny_plain(), scheduler(), tmp_path / "p.npz", 2, 2, sample_shape=(1, 8, 8),
                    disable=True)["images"].shape == (2, 8, 8, 1)


@pytest.mark.parametrize("num", [0, -3, 2.5, True])
def test_generate_names_a_bad_sample_count(tmp_path, num):
    # 0 and -3 were "--num 0 is smaller than the number of processes (1)": a flag the caller never used.
    with pytest.raises(ValueError, match=rf"num_samples must be a whole number ≥ 1, got {num!r}"):
        generate(tiny_unet(), scheduler(), tmp_path / "s.npz", num, 2)
    assert not list(tmp_path.iterdir())
