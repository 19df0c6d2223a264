"""Bit packing of weight codes (against a direct bit loop), packed student files (format version 2) reload
bit-exactly, version-1 files still load, and the model-size figures are the byte counts of the stored tensors."""

from __future__ import annotations

import io
import json

import pytest
import torch

from zeroshot_kd.data import FASHION_MNIST_SPEC
from zeroshot_kd.quant.modules import QuantConfig, quant_layers
from zeroshot_kd.quant.packing import pack_bits, packed_size, unpack_bits
from zeroshot_kd.quant.pipeline import CalibrationOptions, calibrate_student
from zeroshot_kd.quant.size import model_size
from zeroshot_kd.quant.student import _layer_record, load_student, read_student_file, save_student

ARCH = {"builder": "zeroshot_kd.models:cifar_resnet", "kwargs": {"depth": 8, "width": 4}}


def pack_loop(codes: list[int], bits: int) -> bytes:
    """The documented layout, one bit at a time: code i's bit j is stream bit i*b + j = byte k//8, bit k%8."""
    out = bytearray(packed_size(len(codes), bits))
    for i, c in enumerate(codes):
        for j in range(bits):
            if (c >> j) & 1:
                k = i * bits + j
                out[k // 8] |= 1 << (k % 8)
    return bytes(out)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("n", [1, 7, 8, 9, 13, 64, 1001])
def test_pack_matches_bit_loop_and_round_trips(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 2**bits, (n,), generator=g)
    codes[0] = 2**bits - 1  # the extreme codes are always present
    if n > 1:
        codes[1] = 0
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == (n * bits + 7) // 8
    assert bytes(packed.tolist()) == pack_loop(codes.tolist(), bits)
    assert torch.equal(unpack_bits(packed, bits, n), codes)


def test_pack_known_bytes_and_errors():
    # 4 bits: low nibble first; 3 bits: 8 codes 0..7 -> 0b11_010_001_000 ... = bytes 0x88, 0xC6, 0xFA
    assert pack_bits(torch.tensor([1, 2, 3]), 4).tolist() == [0x21, 0x03]
    assert pack_bits(torch.arange(8), 3).tolist() == [0x88, 0xC6, 0xFA]
    with pytest.raises(ValueError, match=r"\[0, 7\]"):
        pack_bits(torch.tensor([8]), 3)
    with pytest.raises(ValueError, match="need 2 bytes"):
        unpack_bits(torch.zeros(1, dtype=torch.uint8), 4, 3)


def calibrated(teacher, config):
    opts = CalibrationOptions(data="gaussian:32", num_images=24, holdout=8, batch_size=12, candidates=10,
                              progress=False)
    return calibrate_student(teacher, config, opts, torch.device("cpu"))


def save_v1(path, student, config, layers, teacher, folded, architecture):
    """The format-version-1 writer of zkd 0.1.0 (one byte per code, float32 zero points), kept verbatim."""
    qlayers = dict(quant_layers(student))
    codes = {}
    for name, layer in qlayers.items():
        q = layer.wq.quantize(layer.weight)
        dtype = torch.uint8 if layer.wq.qmin >= 0 and layer.wq.qmax > 127 else (
            torch.int8 if layer.wq.qmin >= -128 and layer.wq.qmax <= 127 else torch.int16)
        codes[name] = q.to(torch.int16).to(dtype).cpu().contiguous()
    skip = {f"{name}.weight" for name in qlayers}
    state = {k: v.detach().cpu().clone() for k, v in student.state_dict().items() if k not in skip}
    obj = {"format": "zkd-student", "format_version": 1, "zkd_version": "0.1.0",
           "config": {**config.to_dict(), "convention": config.convention()}, "teacher": teacher.to_dict(),
           "architecture": architecture, "folded": [list(p) for p in folded],
           "layers": {name: _layer_record(layers[name], layer) for name, layer in qlayers.items()},
           "codes": codes, "state": state, "calibration": json.loads(json.dumps({}))}
    buf = io.BytesIO()
    torch.save(obj, buf)
    path.write_bytes(buf.getvalue())


@pytest.mark.parametrize("w_bits,w_asym", [(3, False), (4, True)])
def test_packed_student_bit_exact_and_v1_loads(tmp_path, small_teacher, one_thread, w_bits, w_asym):
    config = QuantConfig(w_bits, 4, w_asym=w_asym)
    res = calibrated(small_teacher, config)
    x = torch.randn(6, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = res.student(x)
    v2, v1 = tmp_path / "v2.pt", tmp_path / "v1.pt"
    save_student(v2, res.student, config, res.layers, small_teacher, res.folded, ARCH)
    save_v1(v1, res.student, config, res.layers, small_teacher, res.folded, ARCH)
    for path in (v2, v1):
        with torch.no_grad():
            assert torch.equal(load_student(path)(x), ref)
    raw = read_student_file(v2, decode=False)
    assert raw["format_version"] == 2
    qlayers = dict(quant_layers(res.student))
    for name, entry in raw["codes"].items():
        layer = qlayers[name]
        n = layer.weight.numel()
        if layer.wq.bits == 8:  # first/last layers stay one byte per code
            assert isinstance(entry, torch.Tensor) and entry.numel() == n
        else:
            assert entry["bits"] == w_bits and entry["packed"].numel() == (n * w_bits + 7) // 8
    assert all(v.dtype == torch.uint8 for k, v in raw["state"].items() if k.endswith("zero_point"))
    # both versions decode to the same codes and the same (float32) state
    d1, d2 = read_student_file(v1), read_student_file(v2)
    assert all(torch.equal(d1["codes"][k], d2["codes"][k]) for k in d1["codes"])
    assert all(torch.equal(d1["state"][k], d2["state"][k]) and d1["state"][k].dtype == d2["state"][k].dtype
               for k in d1["state"])


def test_model_size_counts_stored_bytes(tmp_path, small_teacher, one_thread):
    config = QuantConfig(2, 4, keep_8bit=())
    res = calibrated(small_teacher, config)
    path = tmp_path / "s.pt"
    save_student(path, res.student, config, res.layers, small_teacher, res.folded, ARCH)
    size = model_size(path)
    layers = [layer for _, layer in quant_layers(res.student)]
    n = sum(layer.weight.numel() for layer in layers)
    codes = sum((layer.weight.numel() * 2 + 7) // 8 for layer in layers)
    qparams = sum(layer.weight.shape[0] * (4 + 1) for layer in layers)  # float32 scale + uint8 zero point
    assert size.weights == n
    assert size.bits_per_weight == pytest.approx(8 * (codes + qparams) / n)
    fp32 = sum(t.numel() * 4 for t in small_teacher.model.state_dict().values() if t.is_floating_point()) + \
        sum(t.numel() * 8 for t in small_teacher.model.state_dict().values() if not t.is_floating_point())
    assert size.fp32_bytes == fp32 and not size.fp32_estimated
    assert size.student_bytes == path.stat().st_size
    assert size.ratio == pytest.approx(fp32 / path.stat().st_size)
