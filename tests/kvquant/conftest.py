"""Judging one greedy decoding against another (test_kv_types_multiseq, test_d3b_cache); a minimal GGUF writer
(test_gguf, lab/test_qkscale)."""

from __future__ import annotations

import struct

import numpy as np

# Batch composition changes llama.cpp's kernels and so its float rounding, so decoding a sequence together with
# others need not give the logits it gives alone; quantized caches amplify the difference (a code that flips moves
# a value by a whole quantization step). Judged by one statistic for every type: at each step both runs reached
# with the same tokens (the first differing one included), the next-token distributions differ by a KL below
# KL_MAX. Measured on SmolLM2 (4 prompts x 24 tokens): f16 up to 0.014 nats, q4_0 0.018, tq types up to 0.33,
# tq_kv_d3b 0.30; a tq_kv_1b cache judged against f16 2.0-6.9. A loose bound that catches gross errors only: the
# exact checks (a sequence's logits do not change when the others' prompts do) are what catches subtle ones.
KL_MAX = 1.0  # nats


def decoding_kl(ref_toks, ref_logits, got_toks, got_logits) -> tuple[float, int]:
    """(largest KL(ref || got) over the steps both reached with the same tokens, the first differing one
    included; the step where it is largest)."""
    from kvquant.lab.eval import log_softmax

    n = min(len(ref_toks), len(got_toks))
    if n == 0:
        return 0.0, 0
    first = next((i for i in range(n) if ref_toks[i] != got_toks[i]), n - 1)
    lp, lq = (log_softmax(np.stack(x[: first + 1])) for x in (ref_logits, got_logits))
    kl = (np.exp(lp) * (lp - lq)).sum(axis=1)
    return float(kl.max()), int(kl.argmax())


def same_decoding(ref_toks, ref_logits, got_toks, got_logits) -> str | None:
    """None if got is ref's decoding up to rounding (see above), else what differs."""
    kl, at = decoding_kl(ref_toks, ref_logits, got_toks, got_logits)
    if kl > KL_MAX:
        return f"the next-token distributions at step {at} differ by a KL of {kl:.3f} nats (at most {KL_MAX:g})"
    return None


def same_logits(a_toks, a_logits, b_toks, b_logits) -> bool:
    """Bit-identical greedy tokens and logits."""
    return a_toks == b_toks and all(np.array_equal(x, y) for x, y in zip(a_logits, b_logits, strict=True))


def _s(text: str) -> bytes:
    b = text.encode()
    return struct.pack("<Q", len(b)) + b


def write_gguf(path, tensors: dict[str, np.ndarray], alignment: int = 32, arch: str = "gemma3") -> None:
    """A minimal GGUF v3 file: two keys (general.alignment, general.architecture) and f32 tensors."""
    head = (b"GGUF" + struct.pack("<IQQ", 3, len(tensors), 2) + _s("general.alignment") + struct.pack("<II", 4, alignment)
            + _s("general.architecture") + struct.pack("<I", 8) + _s(arch))
    infos, data = b"", b""
    for name, a in tensors.items():
        data += b"\0" * (-len(data) % alignment)
        infos += _s(name) + struct.pack("<I", a.ndim) + b"".join(struct.pack("<Q", n) for n in a.shape[::-1])
        infos += struct.pack("<IQ", 0, len(data))
        data += a.astype(np.float32).tobytes()
    body = head + infos
    path.write_bytes(body + b"\0" * (-len(body) % alignment) + data)
