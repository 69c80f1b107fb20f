"""Hugging Face interop (amtrain.hf): every exported family loads in transformers with no custom
code and gives the same logits; GPT-2 checkpoints built by transformers import exactly; greedy
`generate` equals `amtrain sample --temperature 0`; the refusals are one line each."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from amtrain.cli import app
from amtrain.errors import UserError
from amtrain.hf import export_hf, import_hf
from amtrain.models.decoder import Decoder, DecoderConfig
from amtrain.models.io import load_pretrained
from tests.rollout_helpers import MIDI, decoder_ckpt, fim_decoder_ckpt, lstm_ckpt

transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
TOL = 1e-4  # max abs logit difference, fp32
ASCII = {"tokenizer": "ascii", "tokenizer_params": {}}


def cli(*args: str):
    r = CliRunner().invoke(app, list(args))
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    assert r.exit_code == 0, r.output
    return r.output


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Random norm gains and biases (inits leave them 1 and 0, which would hide a swapped tensor)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.copy_(p + 0.2 * torch.randn(p.shape, generator=g))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("block,norm,hf_class", [
    ("parallel", "layernorm", "PhiForCausalLM"), ("serial", "layernorm", "Starcoder2ForCausalLM"),
    ("serial", "rmsnorm", "ArceeForCausalLM"), ("gpt2", "layernorm", "GPT2LMHeadModel")])
def test_decoder_exports_load_in_transformers_with_same_logits(tmp_path, block, norm, hf_class):
    cfg = DecoderConfig(vocab_size=300, num_layers=2, num_heads=4, d_model=32, max_seq_len=64, block=block,
                        norm=norm, rope_theta=500.0, scale_attn_by_inverse_layer_idx=block == "gpt2")
    torch.manual_seed(0)
    model = Decoder(cfg).eval()
    _perturb(model, 1)
    export_hf(model, ASCII, tmp_path / "hf")
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert type(hf).__name__ == hf_class
    assert not any(info.values()), info  # no missing / unexpected / mismatched tensor
    x = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours, theirs = model(x)[0], hf.eval()(x).logits
    assert ours.shape == theirs.shape == (2, 40, 320)  # padded vocabulary
    assert _max_diff(ours, theirs) <= TOL
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert gen["suppress_tokens"] == list(range(258, 320)) and gen["eos_token_id"] == 256  # ids past ascii
    readme = (tmp_path / "hf" / "README.md").read_text()
    assert "ascii" in readme and "<|endoftext|>" in readme
    # and back: the amtrain folder import-hf writes is the same model
    _, back, meta = import_hf(tmp_path / "hf", tmp_path / "back")
    assert back.cfg == cfg and meta["tokenizer"] == "ascii"
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_t5_exports_as_t5_for_conditional_generation(tmp_path):
    from amtrain.models.t5 import T5
    from amtrain.registry import family

    cfg = family("t5").config("debug", vocab_size=300, pad_token_id=0, decoder_start_token_id=0)
    torch.manual_seed(0)
    model = T5(cfg).eval()
    _perturb(model, 3)
    export_hf(model, ASCII, tmp_path / "hf")
    hf, info = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert type(hf).__name__ == "T5ForConditionalGeneration" and not any(info.values()), info
    g = torch.Generator().manual_seed(4)
    x, dec = torch.randint(0, 300, (2, 30), generator=g), torch.randint(0, 300, (2, 12), generator=g)
    mask = torch.ones_like(x)
    mask[1, 20:] = 0
    with torch.no_grad():
        ours = model(x, mask, decoder_input_ids=dec)[0]
        theirs = hf.eval()(input_ids=x, attention_mask=mask, decoder_input_ids=dec).logits
    assert _max_diff(ours, theirs) <= TOL
    _, back, _ = import_hf(tmp_path / "hf", tmp_path / "back")
    assert back.cfg == cfg and all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())


def _hf_gpt2(folder: Path, seed: int = 0, **over) -> Path:
    """A random GPT-2 built and saved by transformers (biases and gains randomised too)."""
    fields = dict(vocab_size=300, n_positions=64, n_embd=32, n_layer=3, n_head=4, resid_pdrop=0.0,
                  embd_pdrop=0.0, attn_pdrop=0.0, scale_attn_by_inverse_layer_idx=True,
                  initializer_range=0.2, bos_token_id=None, eos_token_id=None)  # peaked attention
    torch.manual_seed(seed)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**fields, **over}))
    _perturb(hf, seed + 1)
    hf.save_pretrained(folder)
    return folder


def test_gpt2_from_transformers_imports_with_same_logits_and_cached_decoding(tmp_path):
    src = _hf_gpt2(tmp_path / "gpt2")
    out = cli("import-hf", str(src), str(tmp_path / "amt"), "--tokenizer", "ascii")
    assert "imported gpt2" in out and "block=gpt2" in out
    model, meta = load_pretrained(tmp_path / "amt")
    assert model.cfg.scale_attn_by_inverse_layer_idx and meta["tokenizer"] == "ascii"
    hf = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    x = torch.randint(0, 300, (2, 50), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert _max_diff(model(x)[0], hf(x).logits) <= TOL
        # KV-cached steps (learned positions offset by the cache) = the full forward
        cache = model.new_cache(2, 50)
        steps = [model(x[:, :7], cache=cache)[0]] + [model(x[:, t:t + 1], cache=cache)[0] for t in range(7, 50)]
        assert _max_diff(torch.cat(steps, 1), hf(x).logits) <= TOL
    # without the inverse-layer scale the logits differ: the flag is honoured, not ignored
    plain = _hf_gpt2(tmp_path / "plain", scale_attn_by_inverse_layer_idx=False)
    # as an old-style pytorch_model.bin (read with weights_only=True, never unpickled)
    from safetensors.torch import load_file

    torch.save(load_file(plain / "model.safetensors"), plain / "pytorch_model.bin")
    (plain / "model.safetensors").unlink()
    _, m2, _ = import_hf(plain, tmp_path / "amt2", tokenizer="ascii")
    with torch.no_grad():
        assert _max_diff(m2(x)[0], transformers.AutoModelForCausalLM.from_pretrained(plain).eval()(x).logits) <= TOL
        assert _max_diff(m2(x)[0], model(x)[0]) > 1e-2


@pytest.fixture(scope="module")
def gpt2_export(tmp_path_factory):
    """A debug decoder on the gpt2 vocabulary (+ the 3 FIM sentinels, which plain sampling never
    emits) and its `amtrain export --format hf` folder."""
    root = tmp_path_factory.mktemp("gpt2_export")
    ckpt = fim_decoder_ckpt(root / "ckpt", "gpt2", max_seq_len=64, seed=3)
    out = cli("export", str(ckpt), str(root / "hf"), "--format", "hf")
    assert "exported" in out
    return ckpt, root / "hf"


def test_greedy_generate_equals_amtrain_sample_token_for_token(gpt2_export):
    from amtrain.generate.loop import generate
    from amtrain.tokens import get_tokenizer

    ckpt, hf_dir = gpt2_export
    tok = get_tokenizer("gpt2")
    prompt, n = "In the beginning God created", 24
    text = cli("sample", str(ckpt), "--prompt", prompt, "-n", str(n), "--temperature", "0").rstrip("\n")
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    hf.generation_config.eos_token_id = None  # amtrain sample runs the full length
    ids = torch.tensor([[tok.eot_id, *tok.encode(prompt)]])
    with torch.no_grad():
        theirs = hf.generate(ids, max_new_tokens=n, do_sample=False)
    model, _ = load_pretrained(ckpt)
    ours = generate(model, ids, n, temperature=0)
    assert theirs.tolist() == ours.tolist()
    assert text == tok.decode(theirs[0, 1:].tolist())
    with pytest.raises(UserError, match="a transformers folder .model_type 'phi'.; convert it with `amtrain import-hf"):
        cli("sample", str(hf_dir))


def test_gpt2_tokenizer_files_are_openais(gpt2_export):
    _, hf_dir = gpt2_export
    ref = REPO / "tests" / "data" / "gpt2_bpe"
    assert json.loads((hf_dir / "vocab.json").read_text()) == json.loads((ref / "encoder.json").read_text())
    ours = [line for line in (hf_dir / "merges.txt").read_text().splitlines()[1:] if line]
    theirs = [line for line in (ref / "vocab.bpe").read_text().splitlines()[1:] if line]
    assert ours == theirs
    from amtrain.tokens import get_tokenizer

    text = (REPO / "data" / "kjv" / "kjv_pentateuch.txt").read_text()[:3000]
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert hf_tok.encode(text) == get_tokenizer("gpt2").encode(text)
    assert hf_tok.eos_token_id == 50256


def test_midi_export_documents_the_id_layout_and_round_trips_to_an_infill(tmp_path):
    ckpt = decoder_ckpt(tmp_path / "midi", "midi", max_seq_len=128)
    cli("export", str(ckpt), str(tmp_path / "hf"), "--format", "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "phi" and config["amtrain"]["tokenizer"] == "midi"
    assert config["amtrain"]["special_ids"]["ANTICIPATE"] == 55027 and config["amtrain"]["vocab_size"] == 55028
    readme = (tmp_path / "hf" / "README.md").read_text()
    assert "ANTICIPATE" in readme and "55028" in readme
    cli("import-hf", str(tmp_path / "hf"), str(tmp_path / "back"))
    out = cli("rollout", str(tmp_path / "back"), "--prompt", str(MIDI), "--out", str(tmp_path / "o"),
              "--mode", "infill", "--infill-range", "2:3", "--seed", "0")
    assert (tmp_path / "o" / "sample_0.mid").is_file(), out


def test_hub_id_unsupported_and_unmapped_are_refused_in_one_line(tmp_path):
    with pytest.raises(UserError) as e:
        import_hf("stanford-crfm/music-small-800k", tmp_path / "x")
    assert str(e.value).startswith("stanford-crfm/music-small-800k is a hub id; download it first and pass the folder")
    lstm = lstm_ckpt(tmp_path / "lstm", "ascii")
    with pytest.raises(UserError, match="arch 'lstm': no transformers family computes it.*decoder, t5"):
        cli("export", str(lstm), str(tmp_path / "l_hf"), "--format", "hf")
    par_rms = Decoder(DecoderConfig(vocab_size=300, num_layers=1, num_heads=2, d_model=16, norm="rmsnorm"))
    with pytest.raises(UserError, match="model.norm='rmsnorm' with model.block='parallel'"):
        export_hf(par_rms, ASCII, tmp_path / "pr")

    @dataclass
    class MoEConfig(DecoderConfig):  # a field added to the config later, unknown to the adapter
        n_routed_experts: int = 0

    small = dict(vocab_size=300, num_layers=1, num_heads=2, d_model=16)
    export_hf(Decoder(MoEConfig(**small)), ASCII, tmp_path / "dense")  # at its default: exported
    with pytest.raises(UserError, match=r"^model.n_routed_experts=8 has no equivalent in transformers' PhiForCausalLM"):
        export_hf(Decoder(MoEConfig(**small, n_routed_experts=8)), ASCII, tmp_path / "moe")
    for over, key in ((dict(activation_function="relu"), "activation_function='relu'"),
                      (dict(tie_word_embeddings=False), "tie_word_embeddings=False")):
        src = _hf_gpt2(tmp_path / key[:8], **over)
        with pytest.raises(UserError, match=f"config.json: {key} cannot be represented"):
            import_hf(src, tmp_path / "y", tokenizer="ascii")
    # a transformers Phi whose biases are not zero is not an amtrain block
    from safetensors.torch import load_file, save_file

    export_hf(Decoder(DecoderConfig(**small)), ASCII, tmp_path / "phi")
    state = load_file(tmp_path / "phi" / "model.safetensors")
    state["model.layers.0.mlp.fc1.bias"][3] = 0.5
    save_file(state, tmp_path / "phi" / "model.safetensors")
    (tmp_path / "phi" / "config.json").write_text(json.dumps(
        {k: v for k, v in json.loads((tmp_path / "phi" / "config.json").read_text()).items() if k != "amtrain"}))
    with pytest.raises(UserError, match="model.layers.0.mlp.fc1.bias is not zero"):
        import_hf(tmp_path / "phi", tmp_path / "w", tokenizer="ascii")
    (tmp_path / "notmodel").mkdir()
    with pytest.raises(UserError, match="not a transformers model folder"):
        import_hf(tmp_path / "notmodel", tmp_path / "z")


def test_init_from_an_imported_gpt2_fine_tunes_it(kjv_gpt2, tmp_path):
    from amtrain.train.export import load_checkpoint_model
    from amtrain.train.loop import train
    from tests.train_helpers import from_args, tiny

    src = _hf_gpt2(tmp_path / "gpt2", vocab_size=50257, n_layer=2)
    _, imported, _ = import_hf(src, tmp_path / "amt")
    args = tiny(kjv_gpt2, tmp_path / "run", **{"train.init_from": str(tmp_path / "amt"), "train.max_steps": 1,
                                              "optim.lr": 1e-9, "optim.min_lr": 0.0, "data.fim_rate": 0.0})
    train(from_args(args))
    tuned, _ = load_checkpoint_model(tmp_path / "run")
    assert tuned.cfg == imported.cfg  # the export's config, not model.size debug
    for k, v in imported.state_dict().items():  # lr 1e-9: still the imported weights
        assert torch.allclose(tuned.state_dict()[k], v, atol=1e-6), k
    with pytest.raises(UserError, match="a decoder model but model.arch is t5"):
        train(from_args({**args, "model.arch": "t5", "train.out_dir": str(tmp_path / "run2")}))


@pytest.fixture(scope="session")
def amt_gpt2(tmp_path_factory) -> Path:
    """A random GPT-2 of the Anticipatory Music Transformer's shape (768 x 12 x 12, vocabulary
    55,028: stanford-crfm/music-small-800k), built and saved by transformers once per session."""
    folder = tmp_path_factory.mktemp("amt_gpt2")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=55028, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                                  scale_attn_by_inverse_layer_idx=True)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_amt_shaped_gpt2_imports_and_infills_through_rollout(amt_gpt2, tmp_path):
    import symusic

    out = cli("import-hf", str(amt_gpt2), str(tmp_path / "amt"))
    assert "tokenizer midi" in out and "num_layers=12" in out
    model, meta = load_pretrained(tmp_path / "amt")
    hf = transformers.AutoModelForCausalLM.from_pretrained(amt_gpt2).eval()
    assert model.num_params() == sum(p.numel() for p in hf.parameters()) > 100_000_000
    assert model.cfg.block == "gpt2" and model.cfg.vocab_size == 55028
    x = torch.randint(0, 55028, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert _max_diff(model(x)[0], hf(x).logits) <= TOL
    del hf
    cli("rollout", str(tmp_path / "amt"), "--prompt", str(MIDI), "--out", str(tmp_path / "o"), "--mode", "infill",
        "--infill-range", "2:2.5", "--seed", "0")
    score = symusic.Score(str(tmp_path / "o" / "sample_0.mid"), ttype="second")
    prompt = symusic.Score(str(MIDI), ttype="second")
    kept = lambda s: sorted(round(n.time, 2) for t in s.tracks for n in t.notes if n.time < 2.0)  # noqa: E731
    assert kept(score) == kept(prompt)  # the prefix is the prompt's
    assert np.isfinite(score.end())
