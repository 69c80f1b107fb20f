"""`SequenceModel`: the contract every model family's module keeps.

The trainer, exports, scaling studies and the decode loop rely on it: the config dataclass the
model was built from as `model.cfg` (saved in exports and checkpoints, so `config_cls(**cfg)`
rebuilds the same shapes), `num_params` and `new_cache(batch, max_len)`. Left-to-right families
take `forward(idx, targets=None, cache=None, last_only=False) -> (logits, loss)`; `flops_per_token` takes the lengths its objective knows (one
window length for LMs; inputs and targets lengths for T5).
"""

from __future__ import annotations

from typing import Any

from torch import nn


class SequenceModel(nn.Module):
    cfg: Any
    """The family's config dataclass this model was built from."""

    def num_params(self, non_embedding: bool = False) -> int:
        """Unique parameters (a tied one counted once); `non_embedding` leaves out the (V, D)
        token embedding (Kaplan et al. 2020)."""
        raise NotImplementedError

    def num_active_params(self) -> int:
        """Parameters one token uses (fewer than `num_params()` for a mixture of experts)."""
        return self.num_params()

    def new_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> Any:
        """An empty generation cache for `batch_size` sequences of up to `max_len` positions
        (decoder: KV cache; LSTM: recurrent state; T5: the decoder's KV cache)."""
        raise NotImplementedError

    def balance_state(self) -> Any:
        """Mixture of experts: tokens routed to each expert since the last bias update, a
        (MoE layers, experts) tensor the trainer sums over ranks; None for a model without
        experts (the default)."""
        return None

    def apply_bias_update(self, load: Any) -> Any:
        """Mixture of experts: move the selection biases by the summed `balance_state` (every
        rank alike) and restart the counts; -> the biases. Only called when `balance_state` is
        not None."""
        raise NotImplementedError
