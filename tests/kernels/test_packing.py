import pytest
import torch

from quantlab.kernels.packing import pack_codes, packed_words, padding_bits, unpack_codes


def stream_oracle(values: list[int], bits: int) -> list[int]:
    """The module docstring's layout, literally: one big integer, value i at bit i * bits, cut into
    32-bit words, each read as a signed int32."""
    stream = sum(v << (i * bits) for i, v in enumerate(values))
    words = [(stream >> (32 * k)) & 0xFFFFFFFF for k in range(packed_words(len(values), bits))]
    return [w - (1 << 32) if w >= 1 << 31 else w for w in words]


LENGTHS = [0, 1, 2, 7, 10, 11, 31, 32, 33, 63, 64, 65, 100, 333]


@pytest.mark.parametrize("bits", range(1, 17))
def test_pack_matches_the_documented_bitstream(bits):
    gen = torch.Generator().manual_seed(bits)
    for n in LENGTHS:
        codes = torch.randint(0, 2**bits, (3, n), generator=gen)
        words = pack_codes(codes, bits)
        assert words.dtype == torch.int32 and words.shape == (3, packed_words(n, bits))
        for row in range(3):
            assert words[row].tolist() == stream_oracle(codes[row].tolist(), bits)


@pytest.mark.parametrize("bits", range(1, 17))
def test_round_trip_any_length_and_leading_shape(bits):
    gen = torch.Generator().manual_seed(100 + bits)
    dtype = torch.uint8 if bits <= 8 else torch.int32
    for n in LENGTHS:
        shape = (2, 3, n) if n % 2 else (5, n)
        codes = torch.randint(0, 2**bits, shape, generator=gen).to(dtype)
        words = pack_codes(codes, bits)
        assert words.shape == (*shape[:-1], -(-n * bits // 32))
        back = unpack_codes(words, bits, n)
        assert back.dtype == dtype and torch.equal(back, codes)
        # extremes: all zeros and all ones (bit 31 set: the int32 word is negative)
        top = torch.full(shape, 2**bits - 1, dtype=dtype)
        assert torch.equal(unpack_codes(pack_codes(top, bits), bits, n), top)
        assert padding_bits(n, bits) == packed_words(n, bits) * 32 - n * bits


def test_worked_example_three_bits():
    assert pack_codes(torch.tensor([1, 2, 3]), 3).tolist() == [0xD1]
    # code 10 sits at stream bits 30..32: two low bits in word 0, the high bit in word 1
    words = pack_codes(torch.tensor([0] * 10 + [5]), 3)
    assert words.tolist() == [0x40000000, 0x00000001]
    assert unpack_codes(words, 3, 11).tolist() == [0] * 10 + [5]


def test_three_bit_values_straddle_every_word_boundary():
    # 32 values = 96 bits = 3 words; values 10 and 21 cross words 0/1 and 1/2
    codes = torch.zeros(32, dtype=torch.uint8)
    codes[10], codes[21] = 0b110, 0b011
    words = pack_codes(codes, 3)
    # code 10: bit 30 = 0, bit 31 = 1 (word 0), bit 32 = 1 (bit 0 of word 1);
    # code 21: bit 63 = 1 (bit 31 of word 1), bits 64, 65 = 1, 0 (word 2)
    unsigned = [1 << 31, 1 | 1 << 31, 1]
    assert words.tolist() == [w - (1 << 32) if w >= 1 << 31 else w for w in unsigned]
    assert torch.equal(unpack_codes(words, 3, 32), codes)


def test_eight_bits_are_the_little_endian_bytes():
    codes = torch.randint(0, 256, (4, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    words = pack_codes(codes, 8)
    assert torch.equal(words.view(torch.uint8), codes)  # value j of a word in bits [8j, 8j + 8)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="3-bit codes"):
        pack_codes(torch.tensor([0, 8]), 3)
    with pytest.raises(ValueError, match="2-bit codes"):
        pack_codes(torch.tensor([-1, 0]), 2)
    with pytest.raises(TypeError, match="integer"):
        pack_codes(torch.tensor([0.0, 1.0]), 2)
    with pytest.raises(ValueError, match="bits"):
        pack_codes(torch.tensor([0]), 0)
    with pytest.raises(ValueError, match="bits"):
        packed_words(4, 17)
    words = pack_codes(torch.tensor([1, 2, 3]), 3)
    with pytest.raises(ValueError, match="words per row"):
        unpack_codes(words, 3, 20)
    with pytest.raises(ValueError, match="padding bits"):
        unpack_codes(words, 3, 2)  # the third code sits where two codes' padding would be
    with pytest.raises(TypeError, match="int32"):
        unpack_codes(words.long(), 3, 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8, 12])
def test_cuda_matches_cpu(bits):
    codes = torch.randint(0, 2**bits, (7, 1000), generator=torch.Generator().manual_seed(bits))
    words = pack_codes(codes, bits)
    on_gpu = pack_codes(codes.cuda(), bits)
    assert on_gpu.is_cuda and torch.equal(on_gpu.cpu(), words)
    assert torch.equal(unpack_codes(on_gpu, bits, 1000).cpu().long(), codes)
