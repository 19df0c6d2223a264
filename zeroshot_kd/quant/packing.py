"""Bit packing of sub-byte integer codes (student files store b-bit weight codes in b bits, not 8).

Layout (little-endian bit stream): the ``n`` unsigned codes ``u[0..n-1]``, each in ``[0, 2^b - 1]``, are written
one after another into a stream of ``n * b`` bits, code ``i`` occupying stream bits ``[i*b, (i+1)*b)`` with its
least significant bit first; stream bit ``k`` is bit ``k % 8`` (value ``1 << (k % 8)``) of byte ``k // 8``. The
last byte is padded with zero bits, so the packed size is ``ceil(n * b / 8)`` bytes. Examples: at 4 bits, byte
``j`` holds ``u[2j]`` in its low nibble and ``u[2j+1]`` in its high nibble; at 3 bits, eight codes fill 3 bytes.

Signed codes are stored with an offset (``u = q - q_min``); the caller records ``q_min``.
"""

from __future__ import annotations

import torch

__all__ = ["pack_bits", "packed_size", "unpack_bits"]


def packed_size(count: int, bits: int) -> int:
    """Bytes taken by ``count`` codes of ``bits`` bits: ``ceil(count * bits / 8)``."""
    return (count * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned integer codes (any shape, flattened in C order) into a uint8 tensor (layout above).

    Works in groups of 8 codes, which fill exactly ``bits`` bytes: the group's ``8 * bits`` bits are assembled
    in one int64 and split into bytes, so memory stays at a few bytes per code.

    Raises:
        ValueError: ``bits`` outside 1..8, or a code outside ``[0, 2^bits - 1]``.
    """
    _check_bits(bits)
    u = codes.detach().reshape(-1).to(torch.int64).cpu()
    n = u.numel()
    if n and (int(u.min()) < 0 or int(u.max()) > (1 << bits) - 1):
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] for {bits}-bit packing, "
                         f"got [{int(u.min())}, {int(u.max())}]")
    groups = (n + 7) // 8
    u = torch.cat([u, u.new_zeros(groups * 8 - n)]).view(groups, 8)
    shifts = torch.arange(8, dtype=torch.int64) * bits
    word = (u << shifts).sum(1)  # at most 8 * 8 = 64 bits; bits 63.. only at b = 8 (sign wraps, masked below)
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8
    out = ((word[:, None] >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)
    return out[:packed_size(n, bits)].contiguous()


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` codes, as a 1-D int64 tensor.

    Raises:
        ValueError: ``bits`` outside 1..8, or ``packed`` shorter than ``ceil(count * bits / 8)`` bytes.
    """
    _check_bits(bits)
    data = packed.detach().reshape(-1).to(torch.int64).cpu()
    need = packed_size(count, bits)
    if data.numel() < need:
        raise ValueError(f"{count} codes of {bits} bits need {need} bytes, got {data.numel()}")
    groups = (count + 7) // 8
    data = torch.cat([data[:need], data.new_zeros(groups * bits - need)]).view(groups, bits)
    word = (data << (torch.arange(bits, dtype=torch.int64) * 8)).sum(1)
    u = (word[:, None] >> (torch.arange(8, dtype=torch.int64) * bits)) & ((1 << bits) - 1)
    return u.reshape(-1)[:count].contiguous()
