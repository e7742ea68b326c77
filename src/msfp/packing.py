"""Integer codes of a format and dense bit packing, for real low-bit checkpoints.

Code layout: unsigned formats use the value's index in ``fmt.values()``; signed formats (FP and INT alike) use
sign-magnitude, ``sign << (bits-1) | magnitude_index``, where ``magnitude_index`` is the value's position among the
non-negative values. For FP formats that index *is* the exponent/mantissa bit field, so the codes are the format's
own encoding. The code ``1000…0`` (negative zero) decodes to 0.

``decode(quantize_to_codes(x, fmt, s, z), fmt) * s + z`` equals ``fake_quant(x, fmt, s, z)`` bit for bit.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from msfp.checks import whole_number
from msfp.formats import Format, _grid_units, checked_params, compute_dtype, get_format, round_to_grid


@functools.lru_cache(maxsize=None)
def _decode_table(fmt: Format) -> torch.Tensor:
    values = fmt.values()
    if not fmt.signed:
        return values
    magnitudes = values[values >= 0]
    # Code with the sign bit set: the negated magnitude; 0.0 - m keeps its zero +0.0 (-m gave -0.0).
    return torch.cat([magnitudes, 0.0 - magnitudes])


def decode_table(fmt: str | Format) -> torch.Tensor:
    """Value of every code (length ``2**bits``), float32."""
    return _decode_table(get_format(fmt)).clone()


def values_to_codes(values: torch.Tensor, fmt: str | Format) -> torch.Tensor:
    """Codes (uint8) of values that lie exactly on the grid of ``fmt`` at unit scale."""
    fmt = get_format(fmt)
    grid = fmt.values().to(values.device)
    if fmt.signed:
        magnitudes = grid[grid >= 0]
        index = torch.searchsorted(magnitudes, values.abs().float())
        codes = index + (values < 0).long() * (1 << (fmt.bits - 1))
        exact = magnitudes[index.clamp(max=len(magnitudes) - 1)] == values.abs()
    else:
        index = torch.searchsorted(grid, values.float())
        codes = index
        exact = grid[index.clamp(max=len(grid) - 1)] == values
    if not exact.all():
        bad = values[~exact][:3].tolist()
        raise ValueError(f"values {bad} are not representable in {fmt.name}")
    return codes.to(torch.uint8)


def quantize_to_codes(x: torch.Tensor, fmt: str | Format, scale, zero_point=None) -> torch.Tensor:
    """The codes ``fake_quant(x, fmt, scale, zero_point)`` rounds to (NaN is rejected: it has no code)."""
    fmt = get_format(fmt)
    scale, zero_point = checked_params(x, fmt, scale, zero_point)
    if torch.isnan(x).any():
        raise ValueError(f"cannot encode NaN in {fmt.name}")
    x = x.to(compute_dtype(x.dtype))  # as fake_quant computes it (checked_params gives the parameters that dtype)
    return values_to_codes(round_to_grid(_grid_units(x, fmt, scale, zero_point), fmt), fmt)


def _check_integers(codes: torch.Tensor, what: str) -> None:
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:  # 1.7 would be taken as 1
        raise ValueError(f"{what} must be integers, got {codes.dtype}")


def decode(codes: torch.Tensor, fmt: str | Format) -> torch.Tensor:
    """Grid values (unit scale, float32) of codes."""
    fmt = get_format(fmt)
    _check_integers(codes, "codes")
    if codes.numel() and not 0 <= int(codes.min()) <= int(codes.max()) < 1 << fmt.bits:  # negative ones would wrap
        raise ValueError(f"codes {int(codes.min())}..{int(codes.max())} are not {fmt.bits}-bit {fmt.name} codes")
    return _decode_table(fmt).to(codes.device)[codes.long()]


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``bits``-bit codes densely into bytes (LSB first); a 4-bit code pair shares one byte."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    _check_integers(codes, "codes")
    if codes.numel() and not 0 <= int(codes.min()) <= int(codes.max()) < 1 << bits:  # checked before the uint8 cast
        raise ValueError(f"codes {int(codes.min())}..{int(codes.max())} do not fit in {bits} bits")
    flat = codes.detach().cpu().reshape(-1).numpy().astype(np.uint8)
    bit_matrix = np.unpackbits(flat[:, None], axis=1, bitorder="little")[:, :bits]
    return torch.from_numpy(np.packbits(bit_matrix.reshape(-1), bitorder="little"))


def unpack(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``count`` codes (uint8)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    count = whole_number("count", count, 0)
    if packed.dtype != torch.uint8:  # another dtype's values would be truncated to bytes
        raise ValueError(f"packed codes must be uint8 bytes, got {packed.dtype}")
    needed = (count * bits + 7) // 8
    if packed.numel() != needed:
        raise ValueError(f"{count} codes of {bits} bits need {needed} bytes, got {packed.numel()}")
    stream = np.unpackbits(packed.cpu().numpy().astype(np.uint8), bitorder="little")[: count * bits]
    codes = np.packbits(stream.reshape(count, bits), axis=1, bitorder="little")[:, 0]
    return torch.from_numpy(codes)
