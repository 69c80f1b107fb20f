"""Rollout: sliding-window continuation, MIDI constraint masks and anticipatory in-filling, T5
sentinel in-filling, audio through a codec, alternate, the training hook and the CLI — on tiny
randomly initialised checkpoints written with save_pretrained."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from amtrain.errors import UserError
from amtrain.generate.loop import generate
from amtrain.generate.window import generate_long, window_start
from amtrain.registry import family
from amtrain.rollout.load import load_rollout_model
from amtrain.rollout.run import RolloutConfig, read_prompt, rollout, write_tapes
from amtrain.tokens.midi import (
    AUTOREGRESS,
    CONTROL_OFFSET,
    DUR_OFFSET,
    MAX_DUR,
    MAX_TIME,
    NOTE_OFFSET,
    REST,
    TIME_OFFSET,
    TIME_RESOLUTION,
)
from tests.rollout_helpers import MIDI, decoder_ckpt, t5_ckpt


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    return {"text": decoder_ckpt(d / "text", "ascii", max_seq_len=32),
            "midi": decoder_ckpt(d / "midi", "midi", max_seq_len=64),
            "t5_text": t5_ckpt(d / "t5_text", "ascii"),
            "t5_midi": t5_ckpt(d / "t5_midi", "midi")}


# --------------------------------------------------------------------------- sliding window
def test_window_start_keeps_header_and_unit_alignment():
    for length in range(41, 200):
        s = window_start(length, keep=40, header=1, unit=3)
        assert (s - 1) % 3 == 0 and 1 + length - s <= 40 and length - s > 40 - 1 - 3


def test_sliding_window_kv_cache_equals_no_cache_across_stitches(ckpts):
    rm = load_rollout_model(ckpts["text"])
    prompt = torch.tensor([[rm.tokenizer.eot_id, *rm.tokenizer.encode("In the beginning")]] * 2)
    kw = dict(stride=8, header=1, temperature=1.0, top_k=40, seed=3)
    cached = generate_long(rm.model, prompt, 70, use_cache=True, **kw)  # 32-token context: 8 windows
    plain = generate_long(rm.model, prompt, 70, use_cache=False, **kw)
    assert cached.shape == (2, prompt.shape[1] + 70)
    assert torch.equal(cached, plain)
    assert torch.equal(cached[:, :prompt.shape[1]], prompt)
    greedy = [generate_long(rm.model, prompt, 40, stride=5, header=1, temperature=0, use_cache=c) for c in (True, False)]
    assert torch.equal(*greedy)


def test_first_window_is_plain_generate_and_seed_reproduces(ckpts):
    rm = load_rollout_model(ckpts["text"])
    prompt = torch.tensor([[rm.tokenizer.eot_id, 65, 66, 67]])
    long = generate_long(rm.model, prompt, 20, seed=5)
    assert torch.equal(long, generate(rm.model, prompt, 20, seed=5))  # fits one window: no stitch
    cfg = RolloutConfig(length=50, seed=11, num_samples=2, top_p=0.9)
    tape = read_prompt(rm, _text(ckpts["text"].parent, "Moses said"), cfg)
    a, b = rollout(rm, tape, cfg), rollout(rm, tape, cfg)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    c = rollout(rm, tape, RolloutConfig(length=50, seed=12, num_samples=2, top_p=0.9))
    assert not np.array_equal(a[0], c[0])


def _text(folder, s, name="prompt.txt"):
    p = folder / name
    p.write_text(s)
    return p


# --------------------------------------------------------------------------- MIDI
def _valid_event_triples(tri: np.ndarray, absolute: bool = False) -> bool:
    """Event triples (no controls, no specials); `absolute` tapes may run past 100 s."""
    t, d, n = tri[:, 0], tri[:, 1], tri[:, 2]
    return bool(np.all((t >= 0) & ((t < MAX_TIME) | absolute) & (d >= DUR_OFFSET) & (d < DUR_OFFSET + MAX_DUR)
                       & (n >= NOTE_OFFSET) & (n <= REST)))


def test_midi_constraint_never_lets_an_invalid_token_through_adversarial_logits():
    """A model whose logits favour forbidden ids (controls, specials, wrong blocks, earlier
    times) by 1e4: over many steps, seeds and sampler settings every id obeys the grammar."""
    from amtrain.generate.grammar import MidiConstraint
    from amtrain.tokens.midi import ANTICIPATE, VOCAB_SIZE

    class Adversary(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.cfg = type("C", (), {"vocab_size": VOCAB_SIZE, "max_seq_len": 400})()
            self.g = torch.Generator().manual_seed(0)

        def forward(self, idx, cache=None, last_only=False):  # generate asks for the last position only
            logits = torch.randn(idx.shape[0], 1, VOCAB_SIZE, generator=self.g)
            logits[..., CONTROL_OFFSET:] += 1e4  # controls and specials
            logits[..., :200] += 2e4  # early onsets (before the current time once it moved on)
            return logits, None

    for seed in range(3):
        for kw in ({"temperature": 1.0}, {"temperature": 0}, {"top_k": 5}, {"top_p": 0.5, "temperature": 2.0}):
            prompt = torch.tensor([[ANTICIPATE, 250, DUR_OFFSET + 10, NOTE_OFFSET + 60]] * 2)
            out = generate(Adversary(), prompt, 3 * 30, seed=seed, use_cache=False,
                           logits_processor=MidiConstraint(header=1, floor=250), **kw)
            for row in out[:, 1:].numpy():
                tri = row.reshape(-1, 3)
                assert _valid_event_triples(tri)
                assert np.all(np.diff(tri[:, 0]) >= 0) and tri[:, 0].min() >= 250


def test_midi_decoder_constraints_property_over_steps_and_seeds(ckpts):
    """The real (random) decoder through the anticipatory loop, across window rebuilds."""
    from amtrain.generate.amt import AmtSampling, amt_generate

    rm = load_rollout_model(ckpts["midi"])
    tape = read_prompt(rm, MIDI, RolloutConfig())
    prompt = tape.triples[:20]
    for seed in range(3):
        flag, tapes = amt_generate(rm.model, prompt, prompt[:0], 2, AmtSampling(seed=seed, top_p=0.98),
                                   floor_time=int(prompt[:, 0].max()), max_new_events=40)
        for tp in tapes:
            new = tp[len(prompt):]
            assert len(new) == 40 and _valid_event_triples(new, absolute=True)
            assert np.all(np.diff(tp[len(prompt) - 1:, 0]) >= 0)  # never an onset before the current time


def test_midi_continue_writes_parseable_midi_and_keeps_prompt(ckpts, tmp_path):
    import mido
    import symusic

    rm = load_rollout_model(ckpts["midi"])
    cfg = RolloutConfig(length=5.0, seconds=True, num_samples=2, seed=0, top_p=0.95)
    tape = read_prompt(rm, MIDI, cfg)
    out = rollout(rm, tape, cfg)
    assert all(np.array_equal(a.triples, b.triples) for a, b in zip(out, rollout(rm, tape, cfg), strict=True))
    prompt_end = tape.triples[:, 0].max()
    for res in out:
        ev = res.triples[res.triples[:, 2] != REST]
        assert np.array_equal(ev[:len(tape.triples)], tape.triples)  # the prompt's events first, unchanged
        new = ev[len(tape.triples):]
        assert np.all(new[:, 0] >= prompt_end) and np.all(new[:, 0] < prompt_end + 5 * TIME_RESOLUTION)
    files = write_tapes(rm, out, tmp_path)
    for f in files[::2]:
        score = symusic.Score(str(f))
        assert score.note_num() >= len(tape.triples)
        mido.MidiFile(str(f))
    ids = np.load(files[1])
    assert ids[0] == out[0].flag and np.array_equal(ids[1:].reshape(-1, 3), out[0].triples)


def test_amt_loop_kv_cache_equals_no_cache_across_window_rebuilds(ckpts):
    from amtrain.generate.amt import AmtSampling, amt_generate

    rm = load_rollout_model(ckpts["midi"])
    tape = read_prompt(rm, MIDI, RolloutConfig())
    runs = [amt_generate(rm.model, tape.triples[:30], tape.triples[30:45] + CONTROL_OFFSET, 2,
                         AmtSampling(seed=4, use_cache=c, stride=18), floor_time=int(tape.triples[29, 0]),
                         max_new_events=30)[1] for c in (True, False)]
    for a, b in zip(*runs, strict=True):
        assert np.array_equal(a, b) and len(a) >= 30 + 30  # many rebuilds of a 64-token window


def test_midi_decoder_infill_keeps_prefix_and_suffix_exactly(ckpts, tmp_path):
    import symusic

    rm = load_rollout_model(ckpts["midi"])
    cfg = RolloutConfig(mode="infill", infill_range=(4.0, 8.0), num_samples=2, seed=1, top_p=0.95)
    tape = read_prompt(rm, MIDI, cfg)
    ev = tape.triples
    a, b = 400, 800
    out = rollout(rm, tape, cfg)
    for res in out:
        got = res.events()
        got = got[got[:, 2] != REST]
        got = got[np.lexsort((got[:, 2], got[:, 1], got[:, 0]))]
        for sel in (lambda e: e[:, 0] < a, lambda e: e[:, 0] >= b):
            want = ev[sel(ev)]
            assert np.array_equal(got[sel(got)], want[np.lexsort((want[:, 2], want[:, 1], want[:, 0]))])
        controls = res.triples[res.triples[:, 2] >= CONTROL_OFFSET]
        assert len(controls) == np.count_nonzero(ev[:, 0] >= b)  # the suffix rode along as controls
        new = got[(got[:, 0] >= a) & (got[:, 0] < b)]
        assert _valid_event_triples(new)
    files = write_tapes(rm, out, tmp_path)
    assert symusic.Score(str(files[0])).note_num() > 0


def test_midi_infill_by_instrument_keeps_that_instrument(ckpts):
    from amtrain.generate.amt import event_instruments

    rm = load_rollout_model(ckpts["midi"])
    tape = read_prompt(rm, MIDI, RolloutConfig())
    instr = int(event_instruments(tape.triples)[0])
    cfg = RolloutConfig(mode="infill", infill_range=(2.0, 6.0), control_instruments=(instr,), seed=0)
    res = rollout(rm, tape, cfg)[0]
    ev = tape.triples
    keep = ev[(event_instruments(ev) == instr) & (ev[:, 0] >= 200)]
    got = res.events()
    got = got[(event_instruments(got) == instr) & (got[:, 0] >= 200) & (got[:, 2] != REST)]
    assert set(map(tuple, keep.tolist())) <= set(map(tuple, got.tolist()))


# --------------------------------------------------------------------------- T5
def test_t5_text_infill_keeps_prefix_and_suffix_and_cache_matches(ckpts, tmp_path):
    rm = load_rollout_model(ckpts["t5_text"])
    tok = rm.tokenizer
    p = _text(tmp_path, "And God said, Let there be<gap>and there was light.")
    cfg = RolloutConfig(mode="infill", num_samples=3, seed=2, length=12)
    segs = read_prompt(rm, p, cfg)
    out = rollout(rm, segs, cfg)
    for ids in out:
        assert np.array_equal(ids[:len(segs[0])], segs[0]) and np.array_equal(ids[len(ids) - len(segs[1]):], segs[1])
        assert 1 <= len(ids) - len(segs[0]) - len(segs[1]) <= 12 and ids.max() < tok.vocab_size
    nocache = rollout(rm, segs, RolloutConfig(mode="infill", num_samples=3, seed=2, length=12, use_cache=False))
    assert all(np.array_equal(x, y) for x, y in zip(out, nocache, strict=True))
    files = write_tapes(rm, out, tmp_path / "o")
    text = files[0].read_text()
    assert text.startswith("And God said, Let there be") and text.endswith("and there was light.")


def test_t5_two_gaps_and_continuation(ckpts, tmp_path):
    rm = load_rollout_model(ckpts["t5_text"])
    segs = read_prompt(rm, _text(tmp_path, "a<gap>b<gap>c"), RolloutConfig())
    out = rollout(rm, segs, RolloutConfig(mode="infill", seed=0, length=5))[0]
    s = rm.tokenizer.decode(out.tolist())
    assert s[0] == "a" and s[-1] == "c" and "b" in s[1:-1] and len(s) >= 5
    cont = rollout(rm, read_prompt(rm, _text(tmp_path, "Genesis"), RolloutConfig()),
                   RolloutConfig(length=40, seed=0, t5_context=16, stride=8))[0]
    assert len(cont) == len("Genesis") + 40 and cont.max() < rm.tokenizer.vocab_size


def test_t5_midi_infill_keeps_prefix_and_suffix(ckpts, tmp_path):
    import symusic

    from amtrain.midi.tokenize import pad

    rm = load_rollout_model(ckpts["t5_midi"])
    cfg = RolloutConfig(mode="infill", infill_range=(3.0, 5.0), seed=0, max_span=30)
    tape = read_prompt(rm, MIDI, cfg)
    res = rollout(rm, tape, cfg)[0]
    tri = res.triples
    before = tri[tri[:, 0] < 300]
    assert np.array_equal(before, tri[:len(before)])
    src = pad(tape.triples, int(tape.triples[:, 0].max()))  # T5 sees the REST-padded sequence
    src_after = src[src[:, 0] >= 500]
    assert np.array_equal(tri[len(tri) - len(src_after):], src_after)
    gap = tri[len(before):len(tri) - len(src_after)]
    assert len(gap) >= 1 and _valid_event_triples(gap) and np.all((gap[:, 0] >= 300) & (gap[:, 0] < 500))
    assert symusic.Score(str(write_tapes(rm, [res], tmp_path)[0])).note_num() > 0


# --------------------------------------------------------------------------- errors
def test_decoder_text_infill_is_a_clear_error(ckpts, tmp_path):
    rm = load_rollout_model(ckpts["text"])
    segs = read_prompt(rm, _text(tmp_path, "a<gap>b"), RolloutConfig())
    with pytest.raises(UserError, match="cannot in-fill.*T5"):
        rollout(rm, segs, RolloutConfig(mode="infill"))
    with pytest.raises(UserError, match="--seconds needs a MIDI or audio"):
        rollout(rm, read_prompt(rm, _text(tmp_path, "a"), RolloutConfig()), RolloutConfig(length=1, seconds=True))
    with pytest.raises(UserError, match="--mode"):
        RolloutConfig(mode="sideways")


# --------------------------------------------------------------------------- alternate
def test_alternate_text_t5_and_midi_decoder(ckpts, tmp_path):
    rm = load_rollout_model(ckpts["t5_text"])
    tape = read_prompt(rm, _text(tmp_path, "In the beginning God created"), RolloutConfig())
    cfg = RolloutConfig(mode="alternate", schedule="ci", iterations=4, length=6, seed=0, max_span=6)
    a = rollout(rm, tape, cfg)[0]
    assert np.array_equal(a[:3], tape[0][:3]) and len(a) >= len(tape[0]) + 12
    assert np.array_equal(a, rollout(rm, tape, cfg)[0])
    from amtrain.tokens.midi import AUTOREGRESS

    rm = load_rollout_model(ckpts["midi"])
    tape = read_prompt(rm, MIDI, RolloutConfig())
    res = rollout(rm, tape, RolloutConfig(mode="alternate", schedule="ic", iterations=2, length=30, seed=0))[0]
    assert res.flag == AUTOREGRESS and not (res.triples[:, 2] >= CONTROL_OFFSET).any()
    ev = res.triples[res.triples[:, 2] != REST]
    end = tape.triples[:, 0].max()
    last = tape.triples[-1]
    assert (ev == last).all(1).any()  # the piece's last note survived the in-fill
    # the continuation comes after the whole piece (not after the in-filled part)
    assert np.count_nonzero(ev[:, 0] >= end) == np.count_nonzero(tape.triples[:, 0] >= end) + 10
    after = np.flatnonzero((ev == last).all(1))[-1]
    assert np.all(ev[after:, 0] >= end)
    write_tapes(rm, [res], tmp_path)


# --------------------------------------------------------------------------- hook + CLI
def test_rollout_hook_gpt2_text_is_the_prompt_and_its_continuation():
    """The document separator the hook puts before a decoder's text prompt is not in the text."""
    from amtrain.models.decoder import Decoder
    from amtrain.tokens import get_tokenizer
    from amtrain.train.rollouts import rollout_hook

    tok = get_tokenizer("gpt2")
    torch.manual_seed(0)
    model = Decoder(family("decoder").config("debug", vocab_size=tok.vocab_size, max_seq_len=64))
    out = rollout_hook(model, ["In the beginning", "And God said"], tokenizer=tok, step=1, length=6)
    assert [t[: len(p)] for t, p in zip(out["texts"], ["In the beginning", "And God said"], strict=True)] == [
        "In the beginning", "And God said"]
    assert not any(t.startswith("<|endoftext|>") for t in out["texts"])


def test_rollout_hook_text_strings_and_midi_files(ckpts, tmp_path):
    from amtrain.models.io import load_pretrained
    from amtrain.tokens import get_tokenizer
    from amtrain.train.rollouts import rollout_hook

    model, _ = load_pretrained(ckpts["text"])
    model.train()
    rng = torch.get_rng_state()
    out = rollout_hook(model, ["In the", "And"], tokenizer=get_tokenizer("ascii"), step=10, length=12)
    assert out["step"] == 10 and len(out["texts"]) == 2 and out["texts"][0].startswith("In the")
    assert model.training and torch.equal(rng, torch.get_rng_state())  # training RNG untouched: resume stays exact
    assert out == rollout_hook(model, ["In the", "And"], tokenizer=get_tokenizer("ascii"), step=10, length=12)
    model, _ = load_pretrained(ckpts["midi"])
    out = rollout_hook(model, [MIDI], tokenizer=get_tokenizer("midi"), step=5, run_dir=tmp_path, length=30)
    assert (tmp_path / "rollouts" / "step_5" / "prompt_0.mid").is_file()


def test_cli_rollout_text_and_errors(ckpts, tmp_path):
    from typer.testing import CliRunner

    from amtrain.cli import app

    p = _text(tmp_path, "Let there be")
    r = CliRunner().invoke(app, ["rollout", str(ckpts["text"]), "--prompt", str(p), "--out", str(tmp_path / "o"),
                                 "--length", "40", "--seed", "1", "-n", "2"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "o" / "sample_1.txt").read_text().startswith("Let there be")
    assert np.load(tmp_path / "o" / "sample_0.npy").size == 1 + len("Let there be") + 40
    assert "sample_0: +40 tokens (added)" in r.output and "sample_1: +40 tokens (added)" in r.output
    r = CliRunner().invoke(app, ["rollout", str(ckpts["text"]), "--prompt", str(p), "--out", str(tmp_path / "o"),
                                 "--mode", "infill"])
    assert r.exit_code != 0 and isinstance(r.exception, UserError)


def test_t5_midi_continuation_keeps_prompt_and_obeys_grammar(ckpts):
    rm = load_rollout_model(ckpts["t5_midi"])
    tape = read_prompt(rm, MIDI, RolloutConfig())
    tape.triples = tape.triples[:40]
    cfg = RolloutConfig(length=60, seed=0, t5_context=64, stride=30, num_samples=2)
    out = rollout(rm, tape, cfg)
    nocache = rollout(rm, tape, RolloutConfig(length=60, seed=0, t5_context=64, stride=30, num_samples=2,
                                              use_cache=False))
    for res, other in zip(out, nocache, strict=True):
        assert np.array_equal(res.triples, other.triples)
        assert np.array_equal(res.triples[:40], tape.triples) and len(res.triples) == 60
        new = res.triples[40:]  # windows re-based each round: absolute onsets may pass 100 s
        assert _valid_event_triples(new, absolute=True) and np.all(np.diff(res.triples[39:, 0]) >= 0)


def test_midi_id_file_prompt_and_bad_prompts(ckpts, tmp_path):
    from amtrain.tokens.midi import AUTOREGRESS

    rm = load_rollout_model(ckpts["midi"])
    tape = read_prompt(rm, MIDI, RolloutConfig())
    ids_file = tmp_path / "p.txt"
    ids_file.write_text(" ".join(map(str, [AUTOREGRESS, *tape.triples[:10].ravel().tolist()])))
    again = read_prompt(rm, ids_file, RolloutConfig())
    assert again.flag == AUTOREGRESS and np.array_equal(again.triples, tape.triples[:10])
    out = rollout(rm, again, RolloutConfig(length=30, seed=0))[0]
    assert np.array_equal(out.triples[:10], tape.triples[:10]) and len(out.triples) == 20
    bad = tmp_path / "bad.txt"
    bad.write_text("1 2 x")
    with pytest.raises(UserError, match="bad.txt: not a file of integer ids"):
        read_prompt(rm, bad, RolloutConfig())
    bad.write_text("1 2")
    with pytest.raises(UserError, match="triples"):
        read_prompt(rm, bad, RolloutConfig())
    bad.write_bytes(b"MThd garbage")
    with pytest.raises(UserError, match="bad.mid"):
        read_prompt(rm, bad.rename(tmp_path / "bad.mid"), RolloutConfig())
    with pytest.raises(UserError, match="no such file"):
        read_prompt(rm, tmp_path / "missing.mid", RolloutConfig())


def test_cli_midi_infill_and_range_errors(ckpts, tmp_path):
    import symusic
    from typer.testing import CliRunner

    from amtrain.cli import app

    args = ["rollout", str(ckpts["midi"]), "--prompt", str(MIDI), "--out", str(tmp_path), "--mode", "infill"]
    r = CliRunner().invoke(app, [*args, "--infill-range", "4:8", "-n", "2", "--top-p", "0.95"])
    assert r.exit_code == 0, r.output
    assert symusic.Score(str(tmp_path / "sample_1.mid")).note_num() > 0
    for bad, msg in (("4-8", "START:END"), ("8:4", "START < END")):
        r = CliRunner().invoke(app, [*args, "--infill-range", bad])
        assert isinstance(r.exception, UserError) and msg in str(r.exception)


def test_t5_recurring_postfix(ckpts, tmp_path):
    from typer.testing import CliRunner

    from amtrain.cli import app

    p = _text(tmp_path, "Verse<gap> Amen.")
    r = CliRunner().invoke(app, ["rollout", str(ckpts["t5_text"]), "--prompt", str(p), "--out", str(tmp_path / "o"),
                                 "--mode", "infill", "--postfix-repeat", "3", "--seed", "4"])
    assert r.exit_code == 0, r.output
    text = (tmp_path / "o" / "sample_0.txt").read_text()
    assert text.startswith("Verse") and text.endswith(" Amen.") and text.count(" Amen.") >= 3
    rm = load_rollout_model(ckpts["t5_text"])
    ids = rollout(rm, read_prompt(rm, p, RolloutConfig()), RolloutConfig(mode="infill", postfix_repeat=3, seed=4))[0]
    assert np.array_equal(ids, np.load(tmp_path / "o" / "sample_0.npy"))
    with pytest.raises(UserError, match="one gap"):
        rollout(rm, read_prompt(rm, _text(tmp_path, "a<gap>b<gap>c"), RolloutConfig()),
                RolloutConfig(mode="infill", postfix_repeat=2))


def test_text_file_drops_the_document_start_header(tmp_path):
    from tests.rollout_helpers import decoder_ckpt

    rm = load_rollout_model(decoder_ckpt(tmp_path / "ckpt", "gpt2"))
    tok = rm.tokenizer
    ids = np.array([tok.eot_id, *tok.encode("In the beginning"), tok.eot_id, *tok.encode(" next")])
    txt, npy = rm.modality.write_tape(rm, ids, tmp_path / "s")
    assert txt.read_text() == "In the beginning<|endoftext|> next" and np.array_equal(np.load(npy), ids)


def test_lstm_checkpoints_continue_text_and_infill_midi(tmp_path):
    """Rollout takes any left-to-right LM: the LSTM baseline continues text across window
    stitches (recurrent state as the cache, equal to recomputation) and in-fills MIDI the AMT way."""
    from tests.rollout_helpers import lstm_ckpt

    rm = load_rollout_model(lstm_ckpt(tmp_path / "text", "ascii", max_seq_len=32))
    prompt = torch.tensor([[rm.tokenizer.eot_id, *rm.tokenizer.encode("In the beginning")]] * 2)
    kw = dict(stride=8, header=1, temperature=1.0, top_k=40, seed=3)
    cached = generate_long(rm.model, prompt, 70, use_cache=True, **kw)
    assert torch.equal(cached, generate_long(rm.model, prompt, 70, use_cache=False, **kw))
    assert torch.equal(cached[:, :prompt.shape[1]], prompt)
    cfg = RolloutConfig(length=40, seed=1)
    out = rollout(rm, read_prompt(rm, _text(tmp_path, "Moses said"), cfg), cfg)
    assert len(out) == 1 and len(out[0]) == 1 + len("Moses said") + 40

    midi = load_rollout_model(lstm_ckpt(tmp_path / "midi", "midi", max_seq_len=64))
    cfg = RolloutConfig(mode="infill", infill_range=(2.0, 4.0), seed=0)
    tape = read_prompt(midi, MIDI, cfg)
    ev = tape.triples
    got = rollout(midi, tape, cfg)[0].events()
    got = got[got[:, 2] != REST]
    order = lambda e: e[np.lexsort((e[:, 2], e[:, 1], e[:, 0]))]  # noqa: E731
    for sel in (lambda e: e[:, 0] < 200, lambda e: e[:, 0] >= 400):  # prefix and suffix kept exactly
        assert np.array_equal(order(got[sel(got)]), order(ev[sel(ev)]))
    assert _valid_event_triples(got[(got[:, 0] >= 200) & (got[:, 0] < 400)])


# --------------------------------------------------------------------------- what a rollout says
def test_summaries_count_what_was_added_and_warn_on_nothing(ckpts, tmp_path):
    """Each sample's line counts what generation added to the tape it started from; nothing
    generated, prompt notes lost and ill-formed triples are warnings."""
    from amtrain.modalities.midi import MidiTape
    from amtrain.rollout.run import summaries

    rm = load_rollout_model(ckpts["text"])
    segs = [np.array([65, 66]), np.array([67])]
    (line, warn), = summaries(rm, segs, [np.array([65, 66, 70, 71, 72, 67])], RolloutConfig(mode="infill"))
    assert line.startswith("+3 tokens (in the gap)") and warn == []
    (line, warn), = summaries(rm, segs, [np.array([65, 66, 67])], RolloutConfig(mode="infill"))
    assert "nothing was generated (0 tokens in the gap)" in warn[0]
    prompt = [np.array([65, 66, 67])]  # a decoder's continuation opens with the document prefix
    (line, warn), = summaries(rm, prompt, [np.array([rm.tokenizer.eot_id, 65, 66, 67, 68])], RolloutConfig())
    assert line.startswith("+1 tokens (added)") and warn == []

    rm = load_rollout_model(ckpts["midi"])
    note = lambda t, p: [TIME_OFFSET + t, DUR_OFFSET + 50, NOTE_OFFSET + p]  # noqa: E731
    before = MidiTape(AUTOREGRESS, np.array([note(0, 60), note(50, 62), note(100, 64)]))
    more = MidiTape(AUTOREGRESS, np.array([note(0, 60), note(50, 62), note(100, 64), note(150, 65), note(200, 67)]))
    (line, warn), = summaries(rm, before, [more], RolloutConfig(length=2, seconds=True))
    assert line == "2 notes added, +1.00 s; 5 notes in all" and warn == []
    lost = MidiTape(AUTOREGRESS, np.array([note(0, 60), note(150, 65)]))
    (line, warn), = summaries(rm, before, [lost], RolloutConfig())
    assert "2 of 3 prompt notes are gone from the result" in warn
    bad = MidiTape(AUTOREGRESS, np.array([note(0, 60), note(50, 62), note(100, 64), [TIME_OFFSET + 120, 5, 7]]))
    (line, warn), = summaries(rm, before, [bad], RolloutConfig())
    assert "no notes were generated" in warn and "1 ill-formed triples dropped when writing" in warn
    mid = rm.modality.write_tape(rm, bad, tmp_path / "bad")[0]
    from amtrain.midi.events import read_notes

    assert len(read_notes(mid).time) == 3


def test_midi_rollout_piano_roll_marks_the_generated_notes(ckpts, tmp_path):
    from amtrain.midi.gm import instrument_name
    from amtrain.modalities.midi import MidiTape, _generated_mask
    from amtrain.tokens.midi import DRUMS

    assert instrument_name(0) == "Acoustic Grand Piano" and instrument_name(40) == "Violin"
    assert instrument_name(DRUMS) == "drums"
    rm = load_rollout_model(ckpts["midi"])
    note = lambda t, p: [TIME_OFFSET + t, DUR_OFFSET + 50, NOTE_OFFSET + p]  # noqa: E731
    before = MidiTape(AUTOREGRESS, np.array([note(100, 60), note(0, 62)]))
    after = MidiTape(AUTOREGRESS, np.array([note(100, 60), note(0, 62), note(150, 65), note(50, 62)]))
    mask = _generated_mask(after.events(), before)
    assert mask.tolist() == [False, True, False, True]  # onset order: 0, 50, 100, 150
    files = rm.modality.write_tape(rm, after, tmp_path / "s", prompt=before)
    assert [f.suffix for f in files] == [".mid", ".npy", ".png"]
    assert files[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
