"""Mixture-of-experts balancing across ranks: after each optimizer step, the tokens every MoE
layer routed to each expert (`SequenceModel.balance_state`) are summed over all ranks, so every
rank moves the selection biases by the same amount (`apply_bias_update`, DeepSeek-V3's
auxiliary-loss-free rule, `amtrain.models.moe`), and the step's load record is made for
metrics.jsonl / TensorBoard (kind "moe"). Models without experts return None and cost nothing.

Record keys, for MoE layer i (0-based among the MoE layers): `moe{i}/fraction` (share of the
routed tokens per expert), `moe{i}/max_over_mean` (1 = perfectly even), `moe{i}/entropy` (nats;
ln E = even) and `moe{i}/bias` (the biases after the update).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from amtrain.models.moe import load_stats


def expert_balance(model, bad: bool) -> dict | None:
    """Collective (every rank). `bad`: the step was skipped (NaN/inf loss): its counts are
    dropped and the biases stay. -> the "moe" record, or None without MoE layers."""
    load = model.balance_state()
    if load is None:
        return None
    load = load.detach().clone().float()
    if dist.is_initialized():
        dist.all_reduce(load)
    biases = model.apply_bias_update(torch.zeros_like(load) if bad else load)
    values: dict = {}
    for i, (row, bias) in enumerate(zip(load.cpu(), biases.cpu(), strict=True)):
        values |= {f"moe{i}/{k}": v for k, v in load_stats(row).items()}
        values[f"moe{i}/bias"] = [round(float(b), 6) for b in bias]
    return values
