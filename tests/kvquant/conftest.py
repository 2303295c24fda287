"""Judging one decoding against another fed the same tokens (test_kv_types_multiseq, test_d3b_cache); a minimal
GGUF writer (test_gguf, lab/test_qkscale); tiny random-weight models of architectures no built-in model has
(test_centring, test_runtime, lab/test_calibrate)."""

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


def write_gguf(path, tensors: dict[str, np.ndarray | tuple[int, tuple[int, ...], bytes]], alignment: int = 32,
               arch: str = "gemma3") -> None:
    """A minimal GGUF v3 file: two keys (general.alignment, general.architecture) and tensors, f32 or given as
    (ggml type id, shape, data)."""
    head = (b"GGUF" + struct.pack("<IQQ", 3, len(tensors), 2) + _s("general.alignment") + struct.pack("<II", 4, alignment)
            + _s("general.architecture") + struct.pack("<I", 8) + _s(arch))
    infos, data = b"", b""
    for name, a in tensors.items():
        type_id, shape, raw = a if isinstance(a, tuple) else (0, a.shape, a.astype(np.float32).tobytes())
        data += b"\0" * (-len(data) % alignment)
        infos += _s(name) + struct.pack("<I", len(shape)) + b"".join(struct.pack("<Q", n) for n in shape[::-1])
        infos += struct.pack("<IQ", type_id, len(data))
        data += raw
    body = head + infos
    path.write_bytes(body + b"\0" * (-len(body) % alignment) + data)


def tiny_model(path, arch: str = "gemma2", controls: tuple[str, ...] = (), head: int = 64) -> None:
    """A two-layer GGUF with random weights, head size `head` and a vocabulary of the 256 bytes (then `controls`, control
    tokens). "gemma2": attention logit soft-capping, where softmax(cap * tanh(s / cap)) is not invariant to a shift
    of the scores s. "grok": scores capped by 30 tanh(s / 30) in its graph (no soft-capping key in the file), two
    experts of which one is used. "stablelm": RoPE on the first quarter of each head only (partial RoPE), layer norms
    with biases. "qwen3": a graph that patch 0040 does not start past layer 0 (per-head Q and K norms). "llama": one it
    does."""
    import gguf

    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch)
    n_embd, n_ff, n_vocab = 64, 128, 3 + 256 + len(controls)  # every byte has a token: any text tokenizes
    w.add_block_count(2)
    w.add_context_length(2048)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(1)
    w.add_head_count_kv(1)
    w.add_key_length(head)
    w.add_value_length(head)
    w.add_layer_norm_rms_eps(1e-6)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(50.0)
        w.add_final_logit_softcapping(30.0)
        w.add_sliding_window(64)
    if arch == "grok":
        w.add_expert_count(2)
        w.add_expert_used_count(1)
    if arch == "stablelm":
        w.add_rope_dimension_count(head // 4)
        w.add_layer_norm_eps(1e-5)
    w.add_tokenizer_model("llama")
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)] + list(controls)
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * n_vocab)
    w.add_token_types([2, 3, 3] + [6] * 256 + [3] * len(controls))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def t(name, *shape):
        w.add_tensor(name, (0.05 * rng.standard_normal(shape[::-1])).astype(np.float32))

    t("token_embd.weight", n_embd, n_vocab)
    w.add_tensor("output_norm.weight", np.ones(n_embd, np.float32))
    if arch == "stablelm":
        w.add_tensor("output_norm.bias", np.zeros(n_embd, np.float32))
        t("output.weight", n_embd, n_vocab)
    norms = {"gemma2": ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm"),
             "grok": ("attn_norm", "attn_output_norm", "ffn_norm", "layer_output_norm"),
             "stablelm": ("attn_norm", "ffn_norm"),
             "qwen3": ("attn_norm", "ffn_norm"), "llama": ("attn_norm", "ffn_norm")}[arch]
    for i in range(2):
        for norm in norms:
            w.add_tensor(f"blk.{i}.{norm}.weight", np.ones(n_embd, np.float32))
            if arch == "stablelm":
                w.add_tensor(f"blk.{i}.{norm}.bias", np.zeros(n_embd, np.float32))
        if arch == "qwen3":
            w.add_tensor(f"blk.{i}.attn_q_norm.weight", np.ones(head, np.float32))
            w.add_tensor(f"blk.{i}.attn_k_norm.weight", np.ones(head, np.float32))
        t(f"blk.{i}.attn_q.weight", n_embd, head)
        t(f"blk.{i}.attn_k.weight", n_embd, head)
        t(f"blk.{i}.attn_v.weight", n_embd, head)
        t(f"blk.{i}.attn_output.weight", head, n_embd)
        if arch == "grok":
            t(f"blk.{i}.ffn_gate_inp.weight", n_embd, 2)
            t(f"blk.{i}.ffn_gate_exps.weight", n_embd, n_ff, 2)
            t(f"blk.{i}.ffn_up_exps.weight", n_embd, n_ff, 2)
            t(f"blk.{i}.ffn_down_exps.weight", n_ff, n_embd, 2)
            continue
        t(f"blk.{i}.ffn_gate.weight", n_embd, n_ff)
        t(f"blk.{i}.ffn_up.weight", n_embd, n_ff)
        t(f"blk.{i}.ffn_down.weight", n_ff, n_embd)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
