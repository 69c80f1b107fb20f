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


def apply_expert_parallel(model, ep_size: int, world_size: int) -> None:
    """Expert parallelism over groups of `ep_size` ranks (`train.ep_size`): DeepSpeed's expert
    groups (`deepspeed.utils.groups`, "ep_size_N"), and every MoE layer's routed experts computed
    on their owner rank (`AllToAllExperts`). The weights stay where ZeRO puts them (every
    expert in the module, so checkpoints, export and resume at any world size are unchanged);
    a rank's gradient of the experts it does not own is zero, so the data-parallel average is
    the one-process gradient. A no-op at ep_size 1."""
    if ep_size == 1:
        return
    from deepspeed.utils import groups

    from amtrain.errors import UserError
    from amtrain.models.moe import MoEFeedForward

    layers = [m for m in model.modules() if isinstance(m, MoEFeedForward)]
    if not layers:
        raise UserError(f"train.ep_size = {ep_size}: the model has no experts; set model.overrides.n_routed_experts "
                        "or train.ep_size 1")
    if world_size % ep_size:
        raise UserError(f"train.ep_size = {ep_size} does not divide the {world_size} ranks; use a divisor")
    if layers[0].n_routed % ep_size:
        raise UserError(f"train.ep_size = {ep_size} does not divide model.n_routed_experts = {layers[0].n_routed}")
    name = f"ep_size_{ep_size}"
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    dispatch = AllToAllExperts(groups._get_expert_parallel_group(name), ep_size, groups._get_expert_parallel_rank(name))
    for m in layers:
        m.dispatch = dispatch


class AllToAllExperts:
    """`MoEFeedForward.dispatch`: (token, slot) rows go to the rank owning their expert (rank i
    of the group owns experts [i E/ep, (i+1) E/ep)), through one autograd all-to-all; each rank
    runs its experts on what it received (`grouped_ffn`) and a second all-to-all brings the
    outputs back. Every rank of the group must call it together (training forwards do)."""

    def __init__(self, group, ep_size: int, ep_rank: int):
        self.group, self.ep, self.rank = group, ep_size, ep_rank

    def __call__(self, rows: torch.Tensor, expert: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
        import warnings

        from torch.distributed.nn.functional import all_to_all_single

        from amtrain.models.moe import grouped_ffn

        E = w_up.shape[0]
        local = E // self.ep
        order = torch.argsort(expert, stable=True)  # by expert, hence by owner rank
        per_expert = torch.bincount(expert, minlength=E)  # (E,) rows this rank sends to each expert
        recv_per_expert = torch.empty(self.ep * local, dtype=per_expert.dtype, device=per_expert.device)
        dist.all_to_all_single(recv_per_expert, per_expert, group=self.group)  # (ep * local,): from rank j, expert i
        send = per_expert.view(self.ep, local).sum(1).tolist()
        recv = recv_per_expert.view(self.ep, local).sum(1).tolist()
        with warnings.catch_warnings():  # its successor in _functional_collectives needs a device mesh
            warnings.simplefilter("ignore", FutureWarning)
            got = all_to_all_single(rows.new_empty(sum(recv), rows.shape[1]), rows[order], recv, send, group=self.group)
            mine = torch.arange(local, device=rows.device).repeat(self.ep).repeat_interleave(recv_per_expert)
            lo = self.rank * local
            out = grouped_ffn(got, mine, w_up[lo:lo + local], w_down[lo:lo + local])
            back = all_to_all_single(rows.new_empty(rows.shape), out, send, recv, group=self.group)
        return back[torch.argsort(order)]
