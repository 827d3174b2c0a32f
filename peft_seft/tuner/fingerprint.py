"""A fingerprint of a base weight, saved with the adapter so that it cannot be loaded onto another base.

Ten int64 numbers per layer (float64 values stored bit-for-bit):

0-2. out and in features, the non-zero count N (the layer's budget);
3-4. sum |W| and sum W^2;
5. the mantissa bits of the base's dtype (23 for fp32, 7 for bf16, 10 for fp16), which sets the tolerances;
6-7. two hashes of the non-zero positions (exact, so they see a permutation, a transposition or a moved non-zero);
8. sum W[p] * u(p) with a pseudo-random weight u(p) in [-1, 1] per position (sees values moved between non-zeros);
9. sum over the trainable positions T of W0[t] * delta[t], refreshed at every save: a base that already holds the
   adapter merged has W0[t] + delta[t] there and is told apart from the right base by about ||delta||^2.

Checks 3-4 and 8 allow for a change of dtype (the rounding of the less precise dtype, see fingerprint_mismatch) and
are exact otherwise; 6-7 are always exact. A fingerprint of five numbers (fields 0-4) is the older format, still
accepted with checks 0-4 only.
"""

from __future__ import annotations

import math

import torch

FINGERPRINT_SIZE = 10
LEGACY_FINGERPRINT_SIZE = 5
EXACT_RTOL = 1e-9  # same dtype on both sides: only the float64 summation order differs
_MASK32 = 2**32 - 1
_HASH_MODULUS = 2**61 - 1
_SEEDS = (0x9E3779B9, 0x7F4A7C15, 0x2545F491)  # two position hashes, then the weights u(p)
_CHUNK = 1 << 22
ALREADY_MERGED = "the base already holds this adapter merged (load the adapter onto the base it was trained on)"


def mantissa_bits(dtype: torch.dtype) -> int:
    return round(-math.log2(torch.finfo(dtype).eps))


def _mix(positions: torch.Tensor, seed: int) -> torch.Tensor:
    """A 32-bit integer hash of each position (xor-shift-multiply rounds; int64 arithmetic never overflows)."""
    x = positions + seed
    x = (x ^ (x >> 32)) & _MASK32
    for _ in range(2):
        x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK32
    return x ^ (x >> 16)


def _float_bits(*values: float) -> list[int]:
    return torch.tensor(values, dtype=torch.float64).view(torch.int64).tolist()


def weight_fingerprint(weight: torch.Tensor) -> torch.Tensor:
    """The fingerprint of an (out, in) weight (see the module docstring); field 9 is NaN (unknown) until the adapter
    is saved."""
    flat = weight.detach().reshape(-1)
    abs_sum = square_sum = weighted = 0.0
    hashes = [0, 0]
    for start in range(0, flat.numel(), _CHUNK):  # bounded temporaries on large weights
        chunk = flat[start : start + _CHUNK].double()
        positions = torch.arange(start, start + chunk.numel(), device=chunk.device)
        abs_sum += float(chunk.abs().sum())
        square_sum += float((chunk * chunk).sum())
        weights = _mix(positions, _SEEDS[2]).double() * (2.0 / _MASK32) - 1.0
        weighted += float((chunk * weights).sum())
        nonzero = positions[chunk != 0]
        for i in range(2):
            hashes[i] = (hashes[i] + int(_mix(nonzero, _SEEDS[i]).sum())) % _HASH_MODULUS
    count = int(torch.count_nonzero(flat))
    header = [weight.shape[0], weight.shape[1], count]
    fields = header + _float_bits(abs_sum, square_sum) + [mantissa_bits(weight.dtype)] + hashes
    return torch.tensor(fields + _float_bits(weighted, math.nan), dtype=torch.int64)


def trained_checksum(base_at_indices: torch.Tensor, values: torch.Tensor) -> float:
    """sum_t W0[t] * delta[t] in float64 (field 9)."""
    return float((base_at_indices.double() * values.detach().double()).sum())


def with_trained_checksum(fingerprint: torch.Tensor, checksum: float) -> torch.Tensor:
    updated = fingerprint.clone()
    updated[9] = _float_bits(checksum)[0]
    return updated


def _floats(fingerprint: torch.Tensor, *fields: int) -> list[float]:
    return fingerprint[list(fields)].view(torch.float64).tolist()


def is_fingerprint(tensor: torch.Tensor) -> bool:
    return tensor.dtype == torch.int64 and tuple(tensor.shape) in ((FINGERPRINT_SIZE,), (LEGACY_FINGERPRINT_SIZE,))


def fingerprint_mismatch(saved: torch.Tensor, current: torch.Tensor) -> str | None:
    """A sentence saying how the saved fingerprint (checked with :func:`is_fingerprint`) differs from the current
    base's, or None when they match."""
    saved, current = saved.cpu(), current.cpu()
    if saved[:2].tolist() != current[:2].tolist():
        return (
            f"weight shape (out, in) {tuple(current[:2].tolist())} differs from the saved {tuple(saved[:2].tolist())}"
        )
    if saved[2] != current[2]:
        return f"the base has {int(current[2])} non-zeros but the adapter was trained on one with {int(saved[2])}"
    bits = min(int(saved[5]) if saved.numel() == FINGERPRINT_SIZE else 7, int(current[5]))
    same_precision = saved.numel() == FINGERPRINT_SIZE and int(saved[5]) == int(current[5])
    # A change of dtype rounds every value by at most 2^-bits of itself; the errors of a sum of N values mostly
    # cancel (about 1/sqrt(N) of the worst case): allow the smaller of the worst case and four times that.
    rtol = EXACT_RTOL if same_precision else 2.0 ** (1 - bits) * min(1.0, 4.0 / max(int(current[2]), 1) ** 0.5)
    saved_sums, current_sums = _floats(saved, 3, 4), _floats(current, 3, 4)
    if any(abs(a - b) > rtol * abs(a) for a, b in zip(saved_sums, current_sums, strict=True)):
        return f"the base weight values differ (checksums {current_sums} vs saved {saved_sums})"
    if saved.numel() == LEGACY_FINGERPRINT_SIZE:
        return None
    if saved[6:8].tolist() != current[6:8].tolist():
        return "the base's non-zeros sit at other positions (another pruning mask, or permuted or transposed weights)"
    (saved_weighted,), (current_weighted,) = _floats(saved, 8), _floats(current, 8)
    if abs(saved_weighted - current_weighted) > rtol * current_sums[0]:
        return "the base weight values sit at other positions (same non-zero pattern, values moved or permuted)"
    return None


def trained_checksum_mismatch(
    saved: torch.Tensor, base_at_indices: torch.Tensor, values: torch.Tensor, base_dtype: torch.dtype
) -> str | None:
    """Compare field 9 with the current base at the trainable positions: a sentence, or None when it matches."""
    if saved.numel() == LEGACY_FINGERPRINT_SIZE:
        return None
    (expected,) = _floats(saved.cpu(), 9)
    if math.isnan(expected):  # not recorded (a state dict taken without SEFTModel._get_adapter_state_dict)
        return None
    found = trained_checksum(base_at_indices, values)
    # Worst-case rounding of a dtype change: each W0[t] moves by at most 2^-bits of itself.
    bits = min(int(saved[5]), mantissa_bits(base_dtype))
    tolerance = 2.0**-bits * float((base_at_indices.double() * values.detach().double()).abs().sum()) + 1e-30
    if abs(found - expected) <= tolerance:
        return None
    delta_square = float(values.detach().double().pow(2).sum())
    if abs(found - expected - delta_square) <= tolerance:
        return ALREADY_MERGED
    return "the base weight values at the adapter's trainable positions differ from its base's"
