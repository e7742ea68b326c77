import dataclasses
from types import SimpleNamespace

import numpy as np
import torch
from diffusers import DDIMScheduler, UNet2DModel

import msfp
from msfp.calibration import trajectory_key
from msfp.identity import differences, model_key, weights_digest
from hash_seeds import outputs_under_hash_seeds
from tiny_models import tiny_plain


def key(model, betas):
    return trajectory_key(model, DDIMScheduler(num_train_timesteps=len(betas), trained_betas=betas), 2, 2, 0,
                          batch_size=2)


def test_trained_betas_count_by_value_not_by_their_printed_form():
    # diffusers keeps trained_betas as the numpy array it was given; keys hashed its str(), which rounds to 8
    # decimals and elides the middle of arrays over 1000 values, so another schedule hit the cache.
    model = tiny_plain()
    betas = np.linspace(1e-4, 0.02, 1000)
    assert key(model, betas) != key(model, betas + 1e-10)
    long = np.linspace(1e-4, 0.02, 2000)
    scaled = long.copy()
    scaled[500:1500] *= 1.5
    assert key(model, long) != key(model, scaled)
    assert key(model, betas) == key(model, betas.copy())


@dataclasses.dataclass
class Settings:
    resolution: int = 8


def test_a_plain_model_whose_config_is_a_dataclass_or_namespace_has_a_key_and_calibrates():
    # model_key did dict(model.config), and calibrate's class_info config.get(...): both failed on such a config.
    model = tiny_plain()
    keys = set()
    for config in (Settings(8), Settings(16), SimpleNamespace(resolution=8), SimpleNamespace(resolution=16)):
        model.config = config
        keys.add(model_key(model, {}))
    assert len(keys) == 2  # by their fields: resolution 8 or 16
    q = msfp.quantize(tiny_plain(), "w4a4-msfp")
    q.config = Settings()
    model.config = Settings()
    msfp.calibrate(q, model, DDIMScheduler(num_train_timesteps=1000), num_samples=2, num_steps=2,
                   sample_shape=(1, 8, 8), disable=True)
    with torch.no_grad():
        assert torch.isfinite(q(torch.randn(2, 1, 8, 8), torch.tensor([1, 500]))).all()


def test_a_compiled_or_data_parallel_model_has_the_digest_of_the_model_it_wraps():
    # Their state_dict names gain "_orig_mod." or "module.": finetune(q, torch.compile(fp)) refused the very model
    # q was calibrated from as "other weights".
    model = tiny_plain()
    for wrapped in (torch.compile(model), torch.nn.DataParallel(model)):
        assert weights_digest(wrapped) == weights_digest(model)
        assert model_key(wrapped, {}) == model_key(model, {})


def test_weights_digests_tell_dtype_shape_and_every_value_apart():
    model = tiny_plain()
    digest = weights_digest(model)
    assert weights_digest(tiny_plain()) == digest
    one_value = tiny_plain()
    one_value.mid.bias.data[3] += 1e-6
    as_bytes = tiny_plain()  # the same bytes read as another dtype
    as_bytes.mid.bias = torch.nn.Parameter(as_bytes.mid.bias.detach().view(torch.int32), requires_grad=False)
    reshaped = tiny_plain()
    reshaped.mid.weight = torch.nn.Parameter(reshaped.mid.weight.detach().reshape(8, 8, 9, 1))
    assert len({digest, *map(weights_digest, (one_value, as_bytes, reshaped))}) == 4


def test_tensor_digests_of_conjugate_and_negative_views_are_those_of_their_values():
    # .view(torch.uint8) refused them ("not supported for conjugate view tensors")
    from msfp.identity import tensor_digest

    z = torch.tensor([1 + 2j, 3 - 1j])
    assert tensor_digest(z.conj()) == tensor_digest(z.conj().resolve_conj())
    assert tensor_digest(z.conj().imag) == tensor_digest(torch.tensor([-2.0, 1.0]))


def test_model_keys_of_sets_and_numpy_scalars_are_stable():
    model = tiny_plain()
    assert model_key(model, dict(steps=np.int64(5), eta=np.float32(0.5))) == model_key(model, dict(steps=5, eta=0.5))
    # A set's order follows string hashing, which differs between processes.
    code = ("from msfp.identity import model_key\n"
            "from tiny_models import tiny_plain\n"
            "print(model_key(tiny_plain(), dict(layers={'conv_in', 'mid', 'out', 'time_embedding'})))\n")
    keys = outputs_under_hash_seeds(code)
    assert len(keys) == 1, keys


def test_a_wrapper_exposing_its_unets_config_has_one_key_in_every_process():
    # A root attribute holding a diffusers config (self.config = self.unet.config, as pipelines expect of a denoiser)
    # was recorded with its _use_default_values, a list in string-hash order: every process had another key, so
    # calibration caches never hit and a checkpoint of it loaded in no other process.
    code = ("import torch\n"
            "from diffusers import UNet2DModel\n"
            "from msfp.identity import base_info, model_key\n"
            "class ConfigWrapper(torch.nn.Module):\n"
            "    def __init__(self):\n"
            "        super().__init__()\n"
            "        torch.manual_seed(0)\n"
            "        self.unet = UNet2DModel.from_config(dict(sample_size=8, in_channels=1, out_channels=1, "
            "block_out_channels=(8,), layers_per_block=1, down_block_types=('DownBlock2D',), "
            "up_block_types=('UpBlock2D',), norm_num_groups=4))\n"
            "        self.config = self.unet.config\n"
            "model = ConfigWrapper()\n"
            "print(model_key(model, {}), sorted(base_info(model)['own']['config'])[:3])\n")
    keys = outputs_under_hash_seeds(code)
    assert len(keys) == 1, keys
    assert "_use_default_values" not in keys.pop()


def test_a_setting_of_nan_equals_itself():
    nan = float("nan")
    assert differences(dict(eps=nan, shifts=[nan, 1.0]), dict(eps=nan, shifts=[nan, 1.0]), ["eps", "shifts"]) == []
    assert differences(dict(eps=nan), dict(eps=1.0), ["eps"]) == ["eps nan there, 1.0 here"]


class Wrapper(torch.nn.Module):
    def __init__(self, **unet_config):
        super().__init__()
        torch.manual_seed(0)
        self.unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8,),
                                layers_per_block=1, down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",),
                                norm_num_groups=4, **unet_config)

    def forward(self, x, t):
        return self.unet(x, t).sample


def test_a_plain_model_key_covers_what_changes_its_output_besides_the_weights():
    # A plain module has no config: its key was class + weights, so these shared calibration and teacher caches.
    base = model_key(tiny_plain(), {})
    other_act, other_padding, own_setting = tiny_plain(), tiny_plain(), tiny_plain()
    other_act.act = torch.nn.Tanh()
    other_padding.mid.padding = (2, 2)
    own_setting.sigma_data = 0.5
    assert len({base, *(model_key(m, {}) for m in (other_act, other_padding, own_setting))}) == 4
    # Lists and dicts of plain values are settings too (they were skipped, as functions are).
    lists, dicts = tiny_plain(), tiny_plain()
    lists.act.shifts, dicts.act.shifts = [1, 1], dict(x=1, y=1)
    keys = {model_key(m, {}) for m in (lists, dicts)}
    lists.act.shifts, dicts.act.shifts = [0, 0], dict(x=0, y=0)
    assert len(keys | {model_key(m, {}) for m in (lists, dicts)}) == 4
    assert model_key(Wrapper(act_fn="mish"), {}) != model_key(Wrapper(), {})  # the inner UNet's config
    # What does not change the output does not count: train mode, msfp's own attributes.
    same = tiny_plain().train()
    same.msfp_base_weights = "digest"
    assert model_key(same, {}) == base == model_key(tiny_plain(), {})
    assert model_key(Wrapper(), {}) == model_key(Wrapper(), {})
