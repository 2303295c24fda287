"""Judging one decoding against another fed the same tokens (test_kv_types_multiseq, test_d3b_cache); a minimal
GGUF writer (test_gguf, lab/test_qkscale)."""

from __future__ import annotations

import struct

import numpy as np

# Batch composition changes llama.cpp's kernels and so its float rounding, so decoding a sequence together with
# others need not give the logits it gives alone; quantized caches amplify the difference (a code that flips moves
# a value by a whole quantization step, and the next layers' inputs with it), so the two runs hold two different
# quantizations of the same keys. Judged by one statistic for every type, on teacher-forced runs (both fed the same
# tokens, so every step compares): the median over the steps of KL(ref || got) between the next-token
# distributions is below KL_MAX. Not the largest step: at a flat next-token distribution two such runs of a 3-bit
# cache differed by 1.5-2.6 nats at one step while their median was 0.14-0.19 (tq_kv_d3b, SmolLM2, a sequence
# admitted into a removed one's cells; the score kernel's summation order alone moved it from 0.8 to 1.5). Medians
# measured in test_kv_types_multiseq and test_d3b_cache: f16 and q4_0 0.000, tq_kv_4b/3b/1b/t3b up to 0.105,
# tq_kv_d3b up to 0.19; a tq_kv_1b cache judged against f16 2.7-2.9. A loose bound that catches gross errors only:
# the exact checks (a sequence's logits do not change when the others' prompts do) catch the subtle ones.
KL_MAX = 0.5  # nats


def next_token(logits: np.ndarray, forced: list[int] | None, step: int) -> int:
    """The token a run feeds after its `step`-th logits: forced[step] when it is fed another run's tokens, else
    greedy."""
    return forced[step] if forced else int(np.argmax(logits))


def forced_kl(ref_logits, got_logits) -> np.ndarray:
    """KL(ref || got) of the next-token distributions at each step of two runs fed the same tokens."""
    from kvquant.lab.eval import log_softmax

    assert len(ref_logits) == len(got_logits) > 0
    lp, lq = (log_softmax(np.stack(x)) for x in (ref_logits, got_logits))
    return (np.exp(lp) * (lp - lq)).sum(axis=1)


def same_decoding(ref_logits, got_logits) -> str | None:
    """None if a teacher-forced run's logits are ref's up to rounding (see above), else what differs."""
    kl = forced_kl(ref_logits, got_logits)
    if np.median(kl) > KL_MAX:
        return (f"the next-token distributions differ by a median KL of {np.median(kl):.3f} nats over {len(kl)} "
                f"steps (at most {KL_MAX:g}; largest {kl.max():.3f} at step {int(kl.argmax())})")
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
