"""Tiny randomly initialised checkpoints for tests/test_rollout*.py, written with save_pretrained
(decoder, a decoder trained to fill in the middle, LSTM and T5, text / MIDI / audio tokenizers)
and a debug EnCodec saved as a HF folder."""

from __future__ import annotations

from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
MIDI = REPO / "data" / "midi" / "music21corpus_bach_bwv66.6.mid"
NUM_SENTINELS = 8


def decoder_ckpt(folder: Path, tokenizer: str, params: dict | None = None, max_seq_len: int = 64, seed: int = 0) -> Path:
    from amtrain.models.decoder import Decoder
    from amtrain.models.io import save_pretrained
    from amtrain.registry import family
    from amtrain.tokens import get_tokenizer

    tok = get_tokenizer(tokenizer, **(params or {}))
    torch.manual_seed(seed)
    model = Decoder(family("decoder").config("debug", vocab_size=tok.vocab_size, max_seq_len=max_seq_len))
    return save_pretrained(model, folder, {"tokenizer": tokenizer, "tokenizer_params": tok.params()})


def fim_decoder_ckpt(folder: Path, tokenizer: str, params: dict | None = None, max_seq_len: int = 48, seed: int = 0,
                     spm_rate: float = 0.5) -> Path:
    """A decoder with the three FIM sentinels above the tokenizer's ids and the layout in its meta
    (as a run with data.fim_rate 0.5 records it)."""
    from amtrain.data.fim import FimSpec
    from amtrain.models.decoder import Decoder
    from amtrain.models.io import save_pretrained
    from amtrain.registry import family, modality_of
    from amtrain.tokens import get_tokenizer

    tok = get_tokenizer(tokenizer, **(params or {}))
    layout = modality_of(tokenizer).span_layout(tok)
    spec = FimSpec(0.5, spm_rate, tok.vocab_size, tok.eot_id, layout.unit, layout.offset, layout.inside_documents)
    torch.manual_seed(seed)
    model = Decoder(family("decoder").config("debug", vocab_size=spec.vocab_size, max_seq_len=max_seq_len))
    return save_pretrained(model, folder, {"tokenizer": tokenizer, "tokenizer_params": tok.params(), "fim": spec.meta()})


def lstm_ckpt(folder: Path, tokenizer: str, max_seq_len: int = 64, seed: int = 0) -> Path:
    from amtrain.models.io import save_pretrained
    from amtrain.models.lstm import LSTMLM
    from amtrain.registry import family
    from amtrain.tokens import get_tokenizer

    tok = get_tokenizer(tokenizer)
    torch.manual_seed(seed)
    model = LSTMLM(family("lstm").config("debug", vocab_size=tok.vocab_size, max_seq_len=max_seq_len))
    return save_pretrained(model, folder, {"tokenizer": tokenizer, "tokenizer_params": tok.params()})


def t5_ckpt(folder: Path, tokenizer: str, params: dict | None = None, seed: int = 0) -> Path:
    from amtrain.data.span_corruption import T5Vocab
    from amtrain.models.io import save_pretrained
    from amtrain.models.t5 import T5
    from amtrain.registry import family
    from amtrain.tokens import get_tokenizer

    tok = get_tokenizer(tokenizer, **(params or {}))
    vocab = T5Vocab(tok.vocab_size, NUM_SENTINELS)
    torch.manual_seed(seed)
    model = T5(family("t5").config("debug", vocab_size=vocab.size, pad_token_id=vocab.pad_id,
                                  decoder_start_token_id=vocab.pad_id))
    return save_pretrained(model, folder, {"tokenizer": tokenizer, "tokenizer_params": tok.params()})


def codec_folder(folder: Path) -> Path:
    """A debug EnCodec 24 kHz (random weights, codebooks fitted to 2 s of real audio)."""
    from tests.audio_helpers import random_model, save_codec

    return save_codec(random_model("24khz", "debug", init_seconds=2.0), folder)
