"""Tiny models of every family msfp supports, built from config (diffusers test style). Nothing is downloaded."""

import torch
from diffusers import (DDIMScheduler, DiTTransformer2DModel, PixArtTransformer2DModel, UNet2DConditionModel,
                       UNet2DModel)
from torch import nn


def tiny_unet():
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, attention_head_dim=4).eval()


def tiny_class_unet():
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, num_class_embeds=3).eval()


def tiny_cond_unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
                                norm_num_groups=4, attention_head_dim=2).eval()


def tiny_sdxl_unet():
    """SDXL's UNet: besides the text, it reads pooled text embeddings and size/crop ids from ``added_cond_kwargs``."""
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
                                norm_num_groups=4, attention_head_dim=2, addition_embed_type="text_time",
                                addition_time_embed_dim=4, projection_class_embeddings_input_dim=6 + 6 * 4).eval()


def sdxl_cond(num_samples: int, seed: int = 0) -> dict:
    """Conditioning for :func:`tiny_sdxl_unet`, nested as its pipeline passes it."""
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.tensor([8.0, 8.0, 0.0, 0.0, 8.0, 8.0])  # original size, crop corner, target size
    return {"encoder_hidden_states": torch.randn(num_samples, 3, 8, generator=gen),
            "added_cond_kwargs": {"text_embeds": torch.randn(num_samples, 6, generator=gen),
                                  "time_ids": sizes.repeat(num_samples, 1)}}


def tiny_dit():
    torch.manual_seed(0)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=4, out_channels=8,
                                 num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=5).eval()


def tiny_pixart():
    """PixArt-α's transformer: forward(x, encoder_hidden_states, timestep), conditioning embeddings registered after
    the output layer, learned variance."""
    torch.manual_seed(0)
    return PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=4, out_channels=8,
                                    num_layers=1, sample_size=8, patch_size=2, caption_channels=8,
                                    cross_attention_dim=8, num_embeds_ada_norm=1000).eval()


def tiny_pixart_1024():
    """PixArt-α at 1024 px: its timestep embedding also reads ``added_cond_kwargs`` (resolution, aspect ratio)."""
    torch.manual_seed(0)
    return PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=6, in_channels=4, out_channels=8,
                                    num_layers=1, sample_size=8, patch_size=2, caption_channels=8,
                                    cross_attention_dim=12, num_embeds_ada_norm=1000,
                                    use_additional_conditions=True).eval()


def pixart_1024_cond(num_samples: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"encoder_hidden_states": torch.randn(num_samples, 3, 8, generator=gen),
            "added_cond_kwargs": {"resolution": torch.tensor([[64.0, 64.0]]).repeat(num_samples, 1),
                                  "aspect_ratio": torch.ones(num_samples, 1)}}


class PlainDenoiser(nn.Module):
    """A plain PyTorch denoiser ``model(x, t)``: one layer reads a SiLU module's output, one a raw input, one a
    functional SiLU (only the statistical detector can see that one)."""

    def __init__(self, channels=1, hidden=8):
        super().__init__()
        self.inp = nn.Conv2d(channels, hidden, 3, padding=1)
        self.act = nn.SiLU()
        self.mid = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.t_proj = nn.Linear(1, hidden)
        self.out = nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, x, t):
        h = self.inp(x) + self.t_proj(t.float().view(-1, 1) / 1000)[:, :, None, None]
        h = self.mid(self.act(h))
        return self.out(torch.nn.functional.silu(h))


def tiny_plain():
    torch.manual_seed(0)
    return PlainDenoiser().eval()


def scheduler():
    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)
