"""Multi-head latent attention in the decoder (amtrain.models.mla): the cached, absorbed decode
equals the full forward, causality, the cache's size and layout, FLOPs, config errors."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from amtrain.errors import UserError
from amtrain.models.decoder import Decoder, DecoderConfig
from amtrain.models.mla import LatentCache
from amtrain.registry import family

# (block, extra fields): both blocks, with and without a query latent, with MoE FFNs
CASES = [("parallel", {}), ("serial", {"q_lora_rank": 24}),
         ("parallel", {"q_lora_rank": 16, "n_routed_experts": 3, "top_k_experts": 2, "moe_d_ff": 48})]


def tiny(block: str = "parallel", seed: int = 0, **kw) -> Decoder:
    torch.manual_seed(seed)
    cfg = DecoderConfig(vocab_size=101, num_layers=2, num_heads=4, d_model=32, max_seq_len=64, block=block,
                        attention="mla", **kw)
    return Decoder(cfg).eval()


def ids(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 101, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("block, kw", CASES)
def test_cached_generation_equals_full_forward(block, kw):
    """Prefill, single steps and chunks through the latent cache (absorbed up-projections) give
    the full (non-absorbed) forward's logits."""
    model = tiny(block, **kw)
    idx = ids(2, 30)
    with torch.no_grad():
        full, _ = model(idx)
        cache = model.new_cache(2, 32)
        assert isinstance(cache, LatentCache)
        out = [model(idx[:, a:b], cache=cache)[0] for a, b in [(0, 7), (7, 8), (8, 9), (9, 14), (14, 30)]]
    assert cache.pos == 30
    torch.testing.assert_close(torch.cat(out, 1), full, atol=1e-5, rtol=0)
    # and the generation loop's last-only step
    with torch.no_grad():
        cache = model.new_cache(2, 32)
        model(idx[:, :29], cache=cache)
        last, _ = model(idx[:, 29:], cache=cache, last_only=True)
    torch.testing.assert_close(last[:, 0], full[:, -1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("block, kw", CASES)
def test_causality_by_gradient(block, kw):
    """d logits[t] / d embedding[t'] is exactly 0 for t' > t and non-zero for t' <= t (MoE
    routing is per token, so MLA + MoE stays causal)."""
    model = tiny(block, **kw)
    idx = ids(2, 12)
    captured = {}

    def keep(_module, _inputs, out):
        out.retain_grad()
        captured["emb"] = out

    model.embed.register_forward_hook(keep)
    for t in (0, 5, 11):
        model.zero_grad()
        logits, _ = model(idx)
        logits[:, t].sum().backward()
        grad = captured["emb"].grad.abs().sum(dim=(0, 2))  # (T,)
        assert torch.all(grad[t + 1:] == 0), f"position {t} depends on the future"
        assert torch.all(grad[: t + 1] > 0), f"position {t} ignores its past"


def test_cache_holds_only_latent_and_rope_key():
    model = tiny(kv_lora_rank=20, qk_rope_head_dim=6)
    cache = model.new_cache(3, 40)
    assert cache.c_kv.shape == (2, 3, 40, 20) and cache.k_rope.shape == (2, 3, 40, 6)
    assert cache.bytes_per_token() == 2 * (20 + 6) * 4
    mha = Decoder(DecoderConfig(vocab_size=101, num_layers=2, num_heads=4, d_model=32, max_seq_len=64)).new_cache(3, 40)
    mha_bytes = (mha.k[:, 0, :, 0].numel() + mha.v[:, 0, :, 0].numel()) * 4  # per position, all layers
    assert mha_bytes == 2 * 2 * 32 * 4 and cache.bytes_per_token() / mha_bytes == pytest.approx(26 / 64)
    with pytest.raises(ValueError, match="KV cache full"), torch.no_grad():
        model(ids(3, 41)[:, :40], cache=cache)
        model(ids(3, 1), cache=cache)


def test_flops_per_token_matches_measured_count():
    """6N + 6 L H (Dqk + Dv) T equals the matmul FLOPs torch counts for one forward+backward;
    the norm gains are the only difference."""
    model = tiny(q_lora_rank=16, qk_nope_head_dim=10, qk_rope_head_dim=4, v_head_dim=6).train()
    B, T = 2, 64
    idx = ids(B, T)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        _, loss = model(idx, idx)
        loss.backward()
    norm_params = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    assert counter.get_total_flops() / (B * T) == model.flops_per_token(T) - 6 * norm_params


def test_defaults_and_errors_name_the_field():
    cfg = family("decoder").config("debug", vocab_size=256, attention="mla")  # head width 16
    assert (cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim) == (64, 16, 8, 16)
    assert family("decoder").config("debug", vocab_size=256).kv_lora_rank is None  # mha: untouched
    with pytest.raises(UserError, match="model.qk_rope_head_dim: must be even"):
        family("decoder").config("debug", vocab_size=256, attention="mla", qk_rope_head_dim=5)
    with pytest.raises(UserError, match="model.attention: unknown value 'gqa'"):
        family("decoder").config("debug", vocab_size=256, attention="gqa")
