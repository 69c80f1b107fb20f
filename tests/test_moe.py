"""Mixture-of-experts FFN (amtrain.models.moe) and its training: routing by biased affinity
with unbiased weights, no dropped tokens, equality with a per-token dense reference, the bias
rule balancing a skewed router, exact resume with the biases, export -> sample on an MoE + MLA
checkpoint, and the load records."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
import yaml
from typer.testing import CliRunner

from amtrain.models.moe import MoEFeedForward
from amtrain.train import checkpoint
from amtrain.train.loop import train
from tests.train_helpers import REPO, from_args, metrics, tiny

D, FF, E = 16, 24, 4


def layer(n_shared: int = 1, top_k: int = 2, speed: float = 0.05, balance: float = 0.01, seed: int = 0) -> MoEFeedForward:
    torch.manual_seed(seed)
    m = MoEFeedForward(D, FF, n_shared, E, top_k, balance, speed)
    m.init_weights(0.2, 0.2)  # larger weights than the model's init: differences show
    return m


def reference(m: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """The same function token by token, expert by expert, from the definition."""
    out = []
    for tok in x.reshape(-1, D).double():
        s = torch.sigmoid(m.gate.weight.double() @ tok)  # (E,)
        chosen = torch.topk(s + m.expert_bias.double(), m.top_k).indices
        y = torch.zeros(D, dtype=torch.float64)
        for e in chosen:
            h = F.gelu(tok @ m.w_up[e].double(), approximate="tanh")
            y += s[e] / s[chosen].sum() * (h @ m.w_down[e].double())
        if m.shared is not None:
            y += m.shared.down.weight.double() @ F.gelu(m.shared.up.weight.double() @ tok, approximate="tanh")
        out.append(y)
    return torch.stack(out).view(x.shape).float()


@pytest.mark.parametrize("top_k", [1, 2])
def test_routes_by_biased_affinity_and_weights_by_unbiased(top_k):
    m = layer(top_k=top_k)
    x = torch.randn(40, D)
    s, idx, g = m.route(x)
    assert s.dtype == g.dtype == torch.float32
    m.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 5.0]))  # expert 3 is picked for every token ...
    s2, idx2, g2 = m.route(x)
    assert torch.equal(s2, s) and (idx2 == 3).any(1).all()
    torch.testing.assert_close(g2, s.gather(1, idx2) / s.gather(1, idx2).sum(1, keepdim=True))  # ... weighted by s
    assert not torch.equal(idx2, idx)
    if top_k == 1:
        assert torch.equal(g2, torch.ones_like(g2))


@pytest.mark.parametrize("bias", [None, [0.0, 0.0, 0.0, 0.0], [0.0, 9.0, 0.0, 0.0], [9.0, 9.0, -9.0, -9.0]],
                         ids=["learned", "zero", "all-to-one", "two-idle"])
def test_equals_per_token_reference_at_any_load_no_token_dropped(bias):
    """The batched experts compute exactly the per-token definition, also when every token goes
    to one expert (no capacity: nothing dropped) or some experts get nothing."""
    m = layer().train()
    if bias is not None:
        m.expert_bias.copy_(torch.tensor(bias))
    x = torch.randn(3, 11, D)
    y = m(x)
    torch.testing.assert_close(y, reference(m, x), atol=1e-5, rtol=1e-4)
    assert m.load.sum() == 3 * 11 * m.top_k  # every (token, slot) reached an expert
    if bias == [0.0, 9.0, 0.0, 0.0]:
        assert m.load[1] == 33
    # gradients reach every weight that saw tokens, through the scatter and gather
    y.sum().backward()
    used = m.load > 0
    assert (m.w_up.grad.flatten(1).abs().sum(1) > 0).eq(used).all()


def test_bias_rule_moves_a_skewed_router_toward_uniform():
    """A router that sends most tokens to expert 0: the bias rule evens the load out; without
    it (speed 0) the skew stays."""
    def run(speed: float) -> list[float]:
        m = layer(n_shared=0, top_k=1, speed=speed, balance=0.0).train()
        with torch.no_grad():
            m.gate.weight[0] += 2.0  # inputs have a positive mean along every axis
        ratios = []
        g = torch.Generator().manual_seed(0)
        for _ in range(120):
            with torch.no_grad():
                m(torch.randn(1, 64, D, generator=g) + 0.5)
            load = m.load.clone().float()
            ratios.append(float(load.max() / load.mean()))
            m.apply_bias_update(load)
        return ratios

    balanced, fixed = run(0.02), run(0.0)
    assert fixed[0] > 2.5 and sum(fixed[-20:]) / 20 > 2.5
    assert sum(balanced[-20:]) / 20 < 1.5 < fixed[0]


def test_bias_stays_fp32_and_counts_exact_under_bf16():
    """DeepSpeed's bf16 mode casts the module: the bias keeps fp32 (a 0.001 step survives at
    0.5) and the token counts stay integers."""
    m = layer(top_k=1, speed=0.001).bfloat16().train()
    assert m.w_up.dtype == torch.bfloat16 and m.expert_bias.dtype == torch.float32 and m.load.dtype == torch.long
    m.expert_bias.fill_(0.5)
    m(torch.randn(1, 300, D, dtype=torch.bfloat16))
    assert int(m.load.sum()) == 300
    m.apply_bias_update(torch.tensor([300.0, 0.0, 0.0, 0.0]))
    assert m.expert_bias.tolist() == pytest.approx([0.499, 0.501, 0.501, 0.501], abs=1e-7)


def test_balance_loss_is_the_sequence_wise_formula():
    m = layer(top_k=1, balance=0.5).train()
    x = torch.randn(2, 8, D)
    m(x)
    s, idx, _ = m.route(x.reshape(-1, D))
    s, idx = s.detach().view(2, 8, E), idx.view(2, 8, 1)
    want = 0.0
    for b in range(2):
        f = torch.stack([(idx[b] == i).sum() * E / 8 for i in range(E)]).float()
        p = (s[b] / s[b].sum(-1, keepdim=True)).mean(0)
        want += 0.5 * float((f * p).sum().detach()) / 2
    assert float(m.balance) == pytest.approx(want, rel=1e-5)
    m.eval()
    m(x)
    assert m.balance is None


def test_active_params_and_first_dense_layers():
    from amtrain.registry import family

    fam = family("decoder")
    dense = fam.build(fam.config("debug", vocab_size=256))
    moe = fam.build(fam.config("debug", vocab_size=256, n_routed_experts=4, top_k_experts=1, n_shared_experts=1,
                               moe_d_ff=64, first_dense_layers=1))
    assert isinstance(moe.blocks[1].mlp, MoEFeedForward) and not isinstance(moe.blocks[0].mlp, MoEFeedForward)
    routed = 4 * 2 * 64 * 64
    assert moe.num_params() - moe.num_params(active=True) == routed * 3 // 4
    # one shared + one active expert of width 64 = one dense MLP of width 128, plus the gate
    assert moe.num_params(active=True) == dense.num_params() - 2 * 64 * 128 + 4 * 64
    assert moe.flops_per_token(64) - dense.flops_per_token(64) == 6 * (moe.num_params(active=True) - dense.num_params())


# ------------------------------------------------------------------ training


# the shipped debug MoE + MLA config's model (4 routed experts, top-2, 1 shared, 64 wide)
MOE_MLA = yaml.safe_load((REPO / "ds_configs" / "moe_mla_debug.yaml").read_text())["model"]["overrides"]


@pytest.fixture(scope="module")
def moe_run(kjv_gpt2, tmp_path_factory):
    """6 steps of the debug decoder with MoE + MLA, checkpoints every 3 steps."""
    out = tmp_path_factory.mktemp("moe")
    return train(from_args(tiny(kjv_gpt2, out, **{"model.overrides": MOE_MLA, "train.max_steps": 6,
                                                  "train.checkpoint_every": 3, "train.eval_every": 3})))


def test_training_records_load_and_biases(moe_run):
    recs = metrics(moe_run.run_dir, "moe")
    assert [r["step"] for r in recs] == list(range(1, 7))
    for r in recs:
        for i in range(2):
            assert sum(r[f"moe{i}/fraction"]) == pytest.approx(1.0, abs=1e-5)
            assert r[f"moe{i}/max_over_mean"] == pytest.approx(max(r[f"moe{i}/fraction"]) * 4, rel=1e-5)
            assert 0 < r[f"moe{i}/entropy"] <= torch.log(torch.tensor(4.0)) + 1e-6
            assert all(abs(b) <= 0.01 * r["step"] + 1e-6 for b in r[f"moe{i}/bias"])
    assert any(b != 0 for b in recs[-1]["moe0/bias"])
    info = json.loads((moe_run.run_dir / "run_info.json").read_text())
    assert info["num_params_active"] == info["num_params"] - 2 * (4 - 2) * 2 * 64 * 64
    state = checkpoint.consolidated_state_dict(moe_run.checkpoint)
    assert state["blocks.0.mlp.expert_bias"].tolist() == pytest.approx(recs[-1]["moe0/bias"], abs=1e-6)


def test_resume_with_biases_equals_uninterrupted(moe_run, kjv_gpt2, tmp_path):
    step3 = moe_run.run_dir / "checkpoints" / "step_00000003"
    resumed = train(from_args(tiny(kjv_gpt2, tmp_path, **{"model.overrides": MOE_MLA, "train.max_steps": 6,
                                                          "train.resume": str(step3), "train.eval_every": 3})))
    for step in (4, 5, 6):
        assert resumed.losses[step] == pytest.approx(moe_run.losses[step], rel=1e-6, abs=0), step
    assert metrics(tmp_path, "moe")[-1] == metrics(moe_run.run_dir, "moe")[-1]
    a = checkpoint.consolidated_state_dict(moe_run.checkpoint)
    b = checkpoint.consolidated_state_dict(resumed.checkpoint)
    assert any("expert_bias" in k for k in a)
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)


def test_export_and_sample_moe_mla(moe_run, tmp_path):
    from amtrain.cli import app
    from amtrain.models.io import load_pretrained

    runner = CliRunner()
    r = runner.invoke(app, ["export", str(moe_run.run_dir), str(tmp_path / "exp")])
    assert r.exit_code == 0, r.output
    model, meta = load_pretrained(tmp_path / "exp")
    assert model.cfg.attention == "mla" and model.cfg.n_routed_experts == 4 and meta["step"] == 6
    state = checkpoint.consolidated_state_dict(moe_run.checkpoint)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    outs = []
    for src in (tmp_path / "exp", moe_run.run_dir):
        r = runner.invoke(app, ["sample", str(src), "--prompt", "In the beginning", "-n", "12", "--seed", "3"])
        assert r.exit_code == 0, r.output
        outs.append(r.output.strip())
    assert outs[0].startswith("In the beginning") and len(outs[0]) > 20 and outs[1].endswith(outs[0])
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("In the beginning")
    r = runner.invoke(app, ["rollout", str(tmp_path / "exp"), "--prompt", str(prompt), "--out", str(tmp_path / "ro"),
                            "--length", "8", "-n", "2"])
    assert r.exit_code == 0, r.output
    texts = [(tmp_path / "ro" / f"sample_{i}.txt").read_text() for i in range(2)]
    assert all(t.startswith("In the beginning") and len(t) > len("In the beginning") for t in texts)


def test_nanogpt_v3_recipe_builds_with_its_shape(repo_root):
    """ds_configs/nanogpt_v3.yaml: the seed's numbers, on the meta device (no memory)."""
    from amtrain.config import from_dict, load_yaml
    from amtrain.registry import family

    cfg = from_dict(load_yaml(repo_root / "ds_configs" / "nanogpt_v3.yaml"))
    fam = family(cfg.model.arch)
    with torch.device("meta"):
        model = fam.build(fam.config(cfg.model.size, vocab_size=55028, max_seq_len=cfg.data.seq_len,
                                     **cfg.model.overrides))
    c = model.cfg
    assert (c.num_layers, c.num_heads, c.d_model, c.dropout, c.attention) == (3, 12, 768, 0.1, "mla")
    assert (c.n_shared_experts, c.n_routed_experts, c.top_k_experts) == (2, 2, 1)
    assert (c.bias_update_speed, c.balance_factor, cfg.data.seq_len) == (0.01, 0.01, 512)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.batch.global_tokens) == (3e-4, 0.03, 32 * 512)
    assert model.num_params() - model.num_params(active=True) == 3 * 2 * 768 * 3072  # one idle expert per layer


@pytest.mark.slow
@pytest.mark.parametrize("ep_size", [1, 2])
def test_two_ranks_zero2_equal_one_process_with_the_same_biases(ep_size, moe_run, kjv_gpt2, tmp_path):
    """2 ranks, ZeRO-2, at the same global batch as the one-process run: data parallel (ep_size
    1: every rank computes every expert) and expert parallel (ep_size 2: each rank stores and
    computes 2 of the 4 experts, in their own ZeRO groups, for both ranks' tokens, exchanged
    all-to-all). The summed expert load gives both ranks the one process's biases; losses,
    biases and the final weights match."""
    from tests.train_helpers import LAUNCHER, argv, assert_same_losses, free_port, losses, run

    args = tiny(kjv_gpt2, tmp_path, **{"model.overrides": MOE_MLA, "train.max_steps": 6, "train.eval_every": 3,
                                       "train.ep_size": ep_size, "train.checkpoint_every": 3})
    run(["deepspeed", "--num_accelerators", "2", "--master_port", str(free_port()), LAUNCHER, *argv(args)])
    assert_same_losses(moe_run.losses, losses(tmp_path), range(1, 7))
    one_w = checkpoint.consolidated_state_dict(moe_run.checkpoint)
    two_w = checkpoint.consolidated_state_dict(tmp_path / "checkpoints" / "step_00000006")
    assert one_w.keys() == two_w.keys()
    for k, v in one_w.items():  # the final weights, full experts gathered from both ranks at ep_size 2
        torch.testing.assert_close(two_w[k], v, rtol=1e-4, atol=1e-6, msg=k)
    if ep_size == 2:  # a world-size-independent checkpoint: resume it on one process
        info = json.loads((tmp_path / "run_info.json").read_text())
        assert info["expert_params_total"] == 2 * 4 * 2 * 64 * 64  # 2 MoE layers, 4 experts of 64 x 64 up + down
        assert info["expert_params_local"] == info["expert_params_total"] // 2  # each rank holds its 2 experts
        from amtrain.cli import app
        from amtrain.models.io import load_pretrained

        r = CliRunner().invoke(app, ["export", str(tmp_path), str(tmp_path / "exp")])
        assert r.exit_code == 0, r.output
        exported = load_pretrained(tmp_path / "exp")[0].state_dict()
        assert all(torch.equal(exported[k], v) for k, v in two_w.items())  # the full model
        step3 = tmp_path / "checkpoints" / "step_00000003"
        resumed = train(from_args(tiny(kjv_gpt2, tmp_path / "one", **{
            "model.overrides": MOE_MLA, "train.max_steps": 6, "train.eval_every": 3, "train.resume": str(step3)})))
        for a, b in zip(metrics(moe_run.run_dir, "moe")[3:], metrics(tmp_path / "one", "moe"), strict=True):
            assert b["moe1/bias"] == pytest.approx(a["moe1/bias"], abs=1e-6), (a, b)  # the biases came back
        assert_same_losses(moe_run.losses, resumed.losses, range(4, 7))
        # 2 ranks at ep_size 2 again: from their own checkpoint (each rank's experts from its own
        # ZeRO file) and from the one-process one (whole experts, each rank takes its own)
        dense = tmp_path / "dense" / "step_00000003"
        shutil.copytree(moe_run.run_dir / "checkpoints" / "step_00000003", dense)
        for name, src in (("same", step3), ("from_one", dense)):
            again = tiny(kjv_gpt2, tmp_path / name, **{"model.overrides": MOE_MLA, "train.max_steps": 6,
                                                       "train.eval_every": 3, "train.ep_size": 2, "train.resume": str(src)})
            run(["deepspeed", "--num_accelerators", "2", "--master_port", str(free_port()), LAUNCHER, *argv(again)])
            assert_same_losses(moe_run.losses, losses(tmp_path / name), range(4, 7))
    one, two = metrics(moe_run.run_dir, "moe"), metrics(tmp_path, "moe")
    for a, b in zip(one, two, strict=True):
        for i in range(2):
            assert b[f"moe{i}/bias"] == pytest.approx(a[f"moe{i}/bias"], abs=1e-6), (a["step"], i)
            assert b[f"moe{i}/fraction"] == pytest.approx(a[f"moe{i}/fraction"], abs=1e-6)


def _ep_worker(rank: int, port: int, out: str) -> None:
    import os

    import deepspeed
    import torch.distributed as dist

    from amtrain.errors import UserError
    from amtrain.train.experts import apply_expert_parallel, expert_weights_gathered

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    deepspeed.init_distributed(dist_backend="gloo")
    m = layer(top_k=2, balance=0.0).train()  # the same weights on both ranks
    x = torch.randn(2, 5 + 3 * rank, D, generator=torch.Generator().manual_seed(rank))  # uneven loads
    ref = m(x)
    ref.sum().backward()
    want = m.w_up.grad.clone()
    m.zero_grad()
    full = m.w_up.detach().clone()
    if rank == 0:
        with pytest.raises(UserError, match="contiguous_gradients"):
            apply_expert_parallel(torch.nn.Sequential(m), 2, 2, {"zero_optimization": {"stage": 2, "contiguous_gradients": False}})
    apply_expert_parallel(torch.nn.Sequential(m), 2, 2, {"zero_optimization": {"stage": 2}})  # sharded: this rank's 2 experts only
    y = m(x)
    y.sum().backward()
    dist.all_reduce(want)
    shard = [bool(torch.equal(m.w_up[i], full[e])) for i, e in enumerate(range(2 * rank, 2 * rank + 2))]
    seq = torch.nn.Sequential(m)
    with expert_weights_gathered(seq):  # what a rank-0-only rollout sees: all experts, no exchange
        whole = m.w_up.shape[0] == 4 and m.dispatch is None and bool(torch.equal(m.w_up, full))
        if rank == 0:
            whole = whole and float((m(x) - ref).abs().max()) < 1e-6
    whole = whole and list(m.w_up.shape) == [2, D, FF] and m.dispatch is not None  # shards back
    torch.save({"out": float((y - ref).abs().max()), "grad": float((m.w_up.grad - want[2 * rank:2 * rank + 2]).abs().max()),
                "shape": list(m.w_up.shape), "shard": shard, "whole": whole}, f"{out}.{rank}")


@pytest.mark.slow
def test_expert_parallel_exchange_computes_the_same_function(tmp_path):
    """Two ranks, all-to-all over gloo: each rank holds and computes only its 2 of the 4
    experts, for tokens of both ranks; outputs equal the single-device layer's, and each rank's
    expert gradient is the single-device gradient of its experts summed over both ranks' tokens;
    gathered (as around a rollout rank 0 runs alone), one rank computes the layer by itself."""
    import torch.multiprocessing as mp

    from tests.train_helpers import free_port

    mp.spawn(_ep_worker, args=(free_port(), str(tmp_path / "r")), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"r.{i}", weights_only=True) for i in range(2))
    for r in (r0, r1):
        assert r["shape"] == [2, D, FF] and r["shard"] == [True, True] and r["whole"]
        assert r["out"] < 1e-6 and r["grad"] < 1e-5
