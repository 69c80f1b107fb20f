"""DeepSeek-V3 Mixture-of-Experts feed-forward (DeepSeek-AI 2024, arXiv 2412.19437, §2.1.2).
torch only, single-device code: expert parallelism, if any, is applied from `amtrain/train/`.

Shape legend:
    N  tokens (B * T)   D  d_model   E  routed experts   K  experts per token (top_k)
    F  width of one expert (moe_d_ff)   C  tokens of the busiest expert in this call

    x ──┬──> shared experts (one MLP of width n_shared * F: always active) ─────────────┐
        │                                                                               (+)──> y
        └──> router: s = sigmoid(x Wg) (fp32)                                            │
                 pick top-K of s + b      (b: per-expert bias, for selection only)       │
                 g = s[top-K] / sum s[top-K]   (weights from the UNBIASED affinities)    │
             ──> sum_k g_k * Expert_k(x) ────────────────────────────────────────────────┘

Decisions:
- Auxiliary-loss-free balancing: the bias `b` (a persistent buffer: saved in checkpoints and
  exports) moves by `bias_update_speed * sign(mean load - load_i)` after each optimizer step,
  from token counts the trainer all-reduces over ranks (`Decoder.balance_state` ->
  `apply_bias_update`), so every rank holds the same bias.
- A small sequence-wise balance loss (eq. 17-20), weighted by `balance_factor`, left by each
  training `forward` in `balance`; the decoder adds it to the training loss.
- No token dropping: every token reaches its K experts whatever the load (no capacity factor).
- Experts run as two batched matmuls over (E, C, D): tokens sorted by expert and padded to the
  busiest expert's count C, no Python loop over tokens or experts.
- Shared experts are fused into one MLP of width n_shared * F (the sum of n_shared MLPs of
  width F is exactly that).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from amtrain.models.layers import MLP


def grouped_ffn(rows: torch.Tensor, expert: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """Row r through expert `expert[r]`: rows (M, D), expert (M,) in [0, E), w_up (E, D, F),
    w_down (E, F, D) -> (M, D) in the rows' order. Rows sorted by expert and padded to the
    busiest expert's count C, then two batched matmuls over (E, C, .): no loop over rows or
    experts, and no row is dropped whatever the load."""
    E, D = w_up.shape[0], rows.shape[1]
    order = torch.argsort(expert, stable=True)  # rows grouped by expert
    counts = torch.bincount(expert, minlength=E)  # (E,)
    C = int(counts.max()) if len(expert) else 0
    starts = torch.cumsum(counts, 0) - counts  # (E,)
    expert_sorted = expert[order]
    slot = torch.arange(len(expert), device=rows.device) - starts[expert_sorted]  # position inside its expert
    buf = rows.new_zeros(E, C, D)
    buf[expert_sorted, slot] = rows[order]  # (E, C, D), zero rows past each expert's count
    h = F.gelu(torch.bmm(buf, w_up), approximate="tanh")  # (E, C, F)
    out = torch.bmm(h, w_down)  # (E, C, D)
    return out[expert_sorted, slot][torch.argsort(order)]  # (M, D) back in the rows' order


class MoEFeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int, n_shared: int, n_routed: int, top_k: int,
                 balance_factor: float, bias_update_speed: float):
        super().__init__()
        if not 1 <= top_k <= n_routed:
            raise ValueError(f"top_k_experts must be in 1..n_routed_experts={n_routed}, got {top_k}")
        self.n_routed, self.top_k, self.d_ff = n_routed, top_k, d_ff
        self.balance_factor, self.bias_update_speed = balance_factor, bias_update_speed
        self.shared = MLP(d_model, n_shared * d_ff) if n_shared else None
        self.gate = nn.Linear(d_model, n_routed, bias=False)  # expert centroids
        self.w_up = nn.Parameter(torch.empty(n_routed, d_model, d_ff))  # (E, D, F)
        self.w_down = nn.Parameter(torch.empty(n_routed, d_ff, d_model))  # (E, F, D), residual projection
        self.expert_bias: torch.Tensor
        self.load: torch.Tensor
        self.register_buffer("expert_bias", torch.zeros(n_routed))  # persistent: in the checkpoint
        self.register_buffer("load", torch.zeros(n_routed, dtype=torch.long), persistent=False)  # tokens per expert since the last update
        self.balance: torch.Tensor | None = None  # the last training call's balance loss
        self.dispatch: Callable | None = None  # expert parallelism, set from amtrain/train (None: all experts here)
        self.init_weights(0.02, 0.02)

    def _apply(self, fn, recurse=True):
        """Casts (model.bfloat16(), as DeepSpeed's bf16 mode does) leave the selection bias in fp32:
        in bf16, steps of bias_update_speed below its resolution (0.002 at 0.5) would vanish."""
        super()._apply(fn, recurse)
        self.expert_bias = self.expert_bias.float()
        return self

    def init_weights(self, std: float, residual_std: float) -> None:
        nn.init.normal_(self.w_up, std=std)
        nn.init.normal_(self.w_down, std=residual_std)
        if self.shared is not None:
            nn.init.normal_(self.shared.down.weight, std=residual_std)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, D) -> (affinities s (N, E) fp32, chosen experts (N, K), their weights (N, K) fp32).
        Chosen by s + bias, weighted by s normalised over the chosen."""
        with torch.autocast(x.device.type, enabled=False):
            s = torch.sigmoid(F.linear(x.float(), self.gate.weight.float()))  # (N, E)
        idx = torch.topk(s + self.expert_bias.float(), self.top_k, dim=-1).indices  # (N, K)
        g = s.gather(1, idx)
        return s, idx, g / g.sum(-1, keepdim=True)

    def experts(self, x: torch.Tensor, idx: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """sum_k g[n, k] * Expert_{idx[n, k]}(x[n]) for every token: (N, D). With a `dispatch`
        set (expert parallelism, `amtrain.train.experts`: w_up / w_down then hold only this rank's
        experts), the (token, slot) rows go through it instead: the same function, the experts
        computed on their owner ranks."""
        N, D = x.shape
        K = self.top_k
        rows = x.repeat_interleave(K, dim=0)  # (N K, D): one row per (token, slot)
        w_up, w_down = self.w_up.to(x.dtype), self.w_down.to(x.dtype)
        ffn = self.dispatch if self.dispatch is not None else grouped_ffn
        y = ffn(rows, idx.reshape(-1), w_up, w_down)  # (N K, D)
        return (y.view(N, K, D) * g.to(x.dtype).unsqueeze(-1)).sum(1)  # (N, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, D) -> y (B, T, D). In training, also counts tokens per expert into `load` and
        leaves the sequence-wise balance loss of this call in `balance` (None in eval) for the
        model to add to its loss: the blocks call every FFN alike, y = FFN(h)."""
        B, T, D = x.shape
        flat = x.reshape(B * T, D)
        s, idx, g = self.route(flat)
        y = self.experts(flat, idx, g)
        if self.shared is not None:
            y = y + self.shared(flat)
        self.balance = None
        if self.training:
            with torch.no_grad():
                self.load += torch.bincount(idx.reshape(-1), minlength=self.n_routed)
            if self.balance_factor > 0:
                self.balance = self.balance_loss(s.view(B, T, -1), idx.view(B, T, -1))
        return y.view(B, T, D)

    def balance_loss(self, s: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """DeepSeek-V3 eq. 17-20, per sequence then averaged: alpha * sum_i f_i P_i with
        f_i = E / (K T) * #tokens routed to i, P_i = mean over t of s_i,t / sum_j s_j,t."""
        B, T, E = s.shape
        chosen = torch.zeros_like(s).scatter_(2, idx, 1.0)  # (B, T, E)
        f = chosen.sum(1) * (E / (self.top_k * T))  # (B, E)
        p = (s / s.sum(-1, keepdim=True)).mean(1)  # (B, E)
        return self.balance_factor * (f * p).sum(-1).mean()

    @torch.no_grad()
    def apply_bias_update(self, load: torch.Tensor) -> None:
        """bias_i += speed * sign(mean load - load_i) from this step's token counts (E,), the same
        on every rank; then the local counts restart."""
        load = load.to(self.expert_bias.device, torch.float32)
        self.expert_bias += self.bias_update_speed * torch.sign(load.mean() - load)
        self.load.zero_()

    def routed_params(self) -> int:
        return self.w_up.numel() + self.w_down.numel()


def load_stats(load: torch.Tensor) -> dict[str, float | list[float]]:
    """Balance figures of one layer's token counts (E,): fraction per expert, max/mean, entropy
    of the fractions (nats; uniform = ln E)."""
    frac = load.float() / load.sum().clamp(min=1)
    entropy = -(frac * frac.clamp(min=1e-12).log()).sum()
    return {"fraction": [round(float(v), 6) for v in frac], "max_over_mean": float(frac.max() * frac.numel()),
            "entropy": float(entropy)}


def _positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"model.{name}: must be a positive integer, got {value!r}")


def resolve_moe_fields(cfg) -> None:
    """Check a `DecoderConfig`'s MoE fields and fill `moe_d_ff` (None -> d_ff) when experts are
    configured (n_routed_experts > 0); a dense config keeps its MoE fields as given."""
    if not isinstance(cfg.n_routed_experts, int) or cfg.n_routed_experts < 0:
        raise ValueError(f"model.n_routed_experts: must be an integer >= 0 (0: dense MLP), got {cfg.n_routed_experts!r}")
    if not cfg.n_routed_experts:
        return
    if cfg.moe_d_ff is None:
        cfg.moe_d_ff = cfg.d_ff
    _positive_int("moe_d_ff", cfg.moe_d_ff)
    _positive_int("top_k_experts", cfg.top_k_experts)
    if cfg.top_k_experts > cfg.n_routed_experts:
        raise ValueError(f"model.top_k_experts: {cfg.top_k_experts} exceeds model.n_routed_experts={cfg.n_routed_experts}")
    if not isinstance(cfg.n_shared_experts, int) or cfg.n_shared_experts < 0:
        raise ValueError(f"model.n_shared_experts: must be an integer >= 0, got {cfg.n_shared_experts!r}")
    if not isinstance(cfg.first_dense_layers, int) or not 0 <= cfg.first_dense_layers <= cfg.num_layers:
        raise ValueError(f"model.first_dense_layers: must be in 0..num_layers={cfg.num_layers}, got {cfg.first_dense_layers!r}")
    for name in ("bias_update_speed", "balance_factor"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"model.{name}: must be >= 0, got {getattr(cfg, name)}")
