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


def apply_expert_parallel(model, ep_size: int, world_size: int, ds_config: dict) -> None:
    """Expert parallelism over groups of `ep_size` ranks (`train.ep_size`): DeepSpeed's expert
    groups (`deepspeed.utils.groups`, "ep_size_N"), and every MoE layer's routed experts computed
    on their owner rank (`AllToAllExperts`). A no-op at ep_size 1.

    Under ZeRO-1/2 the experts are sharded: each rank keeps only its n_routed/ep_size experts as
    the layer's `w_up` / `w_down`, marked as DeepSpeed MoE parameters (`allreduce = False`,
    `group_name`) so `build_optimizer` puts them in their own ZeRO groups, reduced over the
    expert-data-parallel group only. Checkpoints then also carry a world-size-independent
    universal folder with the full expert tensors (`write_universal`). Under ZeRO-0/3 every rank
    keeps every expert (ZeRO-3 partitions them anyway) and a rank's gradient of the experts it
    does not own is zero, so the data-parallel average is the one-process gradient."""
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
    rank = groups._get_expert_parallel_rank(name)
    zero = ds_config.get("zero_optimization", {})
    sharded = int(zero.get("stage", 0)) in (1, 2)
    for key in ("contiguous_gradients", "reduce_scatter"):  # DeepSpeed asserts both for MoE groups
        if sharded and not zero.get(key, True):
            raise UserError(f"train.ep_size = {ep_size} under ZeRO-{zero['stage']} needs zero_optimization.{key} "
                            f"true in the DeepSpeed config (DeepSpeed's MoE parameter groups); remove it or set it true")
    dispatch = AllToAllExperts(groups._get_expert_parallel_group(name), ep_size, rank, sharded)
    for m in layers:
        m.dispatch = dispatch
        if sharded:
            local = m.n_routed // ep_size
            for attr in ("w_up", "w_down"):
                p = torch.nn.Parameter(getattr(m, attr).detach()[rank * local:(rank + 1) * local].clone())
                p.allreduce, p.group_name = False, name  # type: ignore[attr-defined]  # DeepSpeed's MoE marks
                p.amtrain_experts = m.n_routed  # type: ignore[attr-defined]
                setattr(m, attr, p)
            m.__dict__["num_experts"] = m.n_routed  # what DeepSpeed's engine reads of an MoE layer


def sharded_experts(model) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of the expert weights this rank holds a shard of (empty: none sharded)."""
    return [(n, p) for n, p in model.named_parameters() if hasattr(p, "amtrain_experts")]


def expert_shards(model) -> int:
    """The ep_size this rank's experts are sharded over (1: every rank holds every expert)."""
    shards = sharded_experts(model)
    return shards[0][1].amtrain_experts // shards[0][1].shape[0] if shards else 1  # type: ignore[attr-defined]


def expert_param_counts(model) -> dict | None:
    """Routed-expert parameters this rank stores and the model's total, or None without
    sharded experts: for run_info.json (`expert_params_local` = total / ep_size when sharded)."""
    from amtrain.models.moe import MoEFeedForward

    layers = [m for m in model.modules() if isinstance(m, MoEFeedForward)]
    if not layers:
        return None
    local = sum(m.routed_params() for m in layers)
    shards = [p for _, p in sharded_experts(model)]
    total = sum(p.numel() * p.amtrain_experts // p.shape[0] for p in shards) if shards else local  # type: ignore[attr-defined]
    return {"expert_params_local": local, "expert_params_total": total}


def _gather(t: torch.Tensor, p: torch.nn.Parameter) -> torch.Tensor:
    """The full (E, ...) tensor of an expert shard `t` of `p`, from every rank of its expert group."""
    from deepspeed.utils import groups

    group = groups._get_expert_parallel_group(p.group_name)  # type: ignore[attr-defined]
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts)


def write_universal(engine, out) -> None:
    """Collective. A sharded-expert checkpoint's world-size-independent copy in DeepSpeed's
    universal layout (`out` = <checkpoint>/universal, as `ds_to_universal` writes it): per
    parameter its full fp32 value and Adam moments (experts gathered over their expert group,
    marked as expert parameters so DeepSpeed's universal load slices them for any ep_size), the
    optimizer's global state, and the model-states file with the full module. Resume at another
    world size or ep_size and export read it; DeepSpeed's own conversion cannot (it takes the
    rank-local expert groups for data-parallel shards)."""
    from deepspeed.checkpoint.constants import (
        BASE_OPTIMIZER_STATE,
        EP_IS_EXPERT_PARAM,
        EP_NUM_EXPERTS,
        PARAM,
        PARAM_GROUPS,
        PARAM_SHAPES,
    )
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from amtrain.train.safe_load import safe_load

    main = dist.get_rank() == 0
    module = engine.module
    # ZeRO-1/2 link each parameter to its Adam moments once, after the first group's step, when
    # torch's AdamW has made the moments of that group only: link again, now that all exist
    engine.optimizer._hp_optimizer_states_linked = False
    engine.optimizer._lazy_init_hp_params_optimizer_state()
    full_module = {}
    for name, p in module.named_parameters():
        states = {"fp32": safe_get_full_fp32_param(p)}
        for key in ("exp_avg", "exp_avg_sq"):
            states[key] = safe_get_full_optimizer_state(p, key)
        expert = hasattr(p, "amtrain_experts")
        if expert:
            states = {k: _gather(v, p) for k, v in states.items()}
        full_module[name] = states["fp32"].to(p.dtype)
        if not main:
            continue
        folder = out / "zero" / name
        folder.mkdir(parents=True, exist_ok=True)
        for key, value in states.items():
            d = {PARAM: value}
            if expert:
                d |= {EP_IS_EXPERT_PARAM: True, EP_NUM_EXPERTS: p.amtrain_experts}
            torch.save(d, folder / f"{key}.pt")
        step = engine.optimizer.optimizer.state[engine.optimizer.optimizer.param_groups[0]["params"][0]].get("step")
        if step is not None:
            torch.save(step, folder / "step.pt")
    if main:
        ckpt = out.parent
        optim = safe_load(ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt")["optimizer_state_dict"]
        global_sd = {k: v for k, v in optim.items()
                     if k not in (BASE_OPTIMIZER_STATE, "param_slice_mappings", "single_partition_of_fp32_groups")}
        global_sd[PARAM_GROUPS] = optim[BASE_OPTIMIZER_STATE][PARAM_GROUPS]
        torch.save(global_sd, out / "zero" / "optimizer_state.pt")
        states = safe_load(ckpt / "mp_rank_00_model_states.pt")
        states["module"] = {**states["module"], **full_module}
        states[PARAM_SHAPES] = [{n: full_module[n].shape for n in group} for group in states[PARAM_SHAPES]]
        torch.save(states, out / "mp_rank_00_model_states.pt")


def restore_expert_shards(model) -> None:
    """Collective. After a checkpoint load: each rank's expert shards from its fp32 master copy in
    the ZeRO optimizer. DeepSpeed loads the module from rank 0's model-states file on every rank
    (rank 0's experts) and restores only the fp32 partitions from each rank's own file."""
    from deepspeed.utils import safe_get_full_fp32_param

    with torch.no_grad():
        for _, p in sharded_experts(model):
            p.copy_(safe_get_full_fp32_param(p).to(p.dtype))


class expert_weights_gathered:
    """Every rank enters it: inside, each MoE layer holds all its experts' weights and computes
    them itself (no dispatch), so a generate or rollout that only some ranks run issues no
    collective; the shards come back on exit. A no-op without sharded experts."""

    def __init__(self, model):
        self.model = model
        self.saved: list = []

    def __enter__(self):
        from amtrain.models.moe import MoEFeedForward

        for m in self.model.modules():
            if isinstance(m, MoEFeedForward) and hasattr(m.w_up, "amtrain_experts"):
                shards = (m.w_up, m.w_down, m.dispatch)
                with torch.no_grad():
                    full = [_gather(p.detach(), p) for p in shards[:2]]
                self.saved.append((m, shards))
                m._parameters["w_up"], m._parameters["w_down"] = (torch.nn.Parameter(t, requires_grad=False) for t in full)
                m.dispatch = None
        return self

    def __exit__(self, *exc):
        for m, (w_up, w_down, dispatch) in self.saved:
            m._parameters["w_up"], m._parameters["w_down"], m.dispatch = w_up, w_down, dispatch
        self.saved = []
        return False


class AllToAllExperts:
    """`MoEFeedForward.dispatch`: (token, slot) rows go to the rank owning their expert (rank i
    of the group owns experts [i E/ep, (i+1) E/ep)), through one autograd all-to-all; each rank
    runs its experts on what it received (`grouped_ffn`) and a second all-to-all brings the
    outputs back. Every rank of the group must call it together (training and validation
    forwards do). `sharded`: the layer's w_up / w_down hold only this rank's experts."""

    def __init__(self, group, ep_size: int, ep_rank: int, sharded: bool = False):
        self.group, self.ep, self.rank, self.sharded = group, ep_size, ep_rank, sharded

    def __call__(self, rows: torch.Tensor, expert: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
        import warnings

        from torch.distributed.nn.functional import all_to_all_single

        from amtrain.models.moe import grouped_ffn

        if self.sharded:
            local = w_up.shape[0]
            E = local * self.ep
        else:
            E = w_up.shape[0]
            local = E // self.ep
            lo = self.rank * local
            w_up, w_down = w_up[lo:lo + local], w_down[lo:lo + local]
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
            out = grouped_ffn(got, mine, w_up, w_down)
            back = all_to_all_single(rows.new_empty(rows.shape), out, send, recv, group=self.group)
        return back[torch.argsort(order)]
