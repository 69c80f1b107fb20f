"""The tokenizer files beside a transformers export.

gpt2 datasets: GPT-2's own files, made offline from the ranks file amtrain ships
(`amtrain/tokens/assets/gpt2.tiktoken`): `vocab.json` + `merges.txt` (the byte-level BPE of
OpenAI's encoder.json / vocab.bpe) and `tokenizer.json` (+ tokenizer_config.json), so
`AutoTokenizer.from_pretrained(OUT)` encodes as amtrain's `gpt2` tokenizer does.

Other vocabularies (MIDI events, audio codes, ascii): transformers has no tokenizer class for
them; the id layout goes into config.json ("amtrain": tokenizer, params, vocab_size, eot_id,
special_ids) and README.md explains it (the tokenizer module's own layout table).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

from amtrain.fileio import write_bytes_atomic
from amtrain.hf.common import require_transformers
from amtrain.tokens import get_tokenizer
from amtrain.tokens.text import ENDOFTEXT, GPT2_RANKS_FILE


def gpt2_vocab_merges(ranks_file: str | Path = GPT2_RANKS_FILE) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """GPT-2's vocab.json dict and merges from a tiktoken ranks file (ranks are merge order: the
    token of rank r is the merge of the two parts BPE reaches using merges below r)."""
    from tiktoken.load import load_tiktoken_bpe
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    ranks = load_tiktoken_bpe(str(ranks_file))
    enc = bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(enc[x] for x in b)

    vocab = {text(tok): rank for tok, rank in ranks.items()}
    vocab[ENDOFTEXT] = 50256
    merges = []
    for tok, rank in ranks.items():
        if len(tok) > 1:
            left, right = _bpe(ranks, tok, rank)
            merges.append((rank, text(left), text(right)))
    return vocab, [(a, b) for _, a, b in sorted(merges)]


def _bpe(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """Byte-pair merge `token` using only merges of rank < max_rank (tiktoken's algorithm): for
    the token of rank max_rank this stops at the two parts its own merge joins."""
    parts = [bytes([b]) for b in token]
    while True:
        best = min(((ranks[a + b], i) for i, (a, b) in enumerate(zip(parts, parts[1:], strict=False))
                    if a + b in ranks), default=None)
        if best is None or best[0] >= max_rank:
            return parts
        i = best[1]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]


def write_gpt2_files(out: Path) -> list[str]:
    tf = require_transformers()
    vocab, merges = gpt2_vocab_merges()
    tok = tf.GPT2TokenizerFast(vocab=vocab, merges=merges, unk_token=ENDOFTEXT, bos_token=ENDOFTEXT,
                               eos_token=ENDOFTEXT)
    tok.save_pretrained(str(out))  # tokenizer.json + tokenizer_config.json
    # OpenAI's own two files as well (encoder.json / vocab.bpe under transformers' names)
    write_bytes_atomic(out / "vocab.json", json.dumps(vocab, ensure_ascii=False).encode())
    write_bytes_atomic(out / "merges.txt", ("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)).encode())
    return ["tokenizer.json", "vocab.json", "merges.txt"]


def id_layout(name: str, params: dict) -> dict:
    tok = get_tokenizer(name, **params)
    return {"tokenizer": name, "tokenizer_params": params, "vocab_size": tok.vocab_size, "eot_id": tok.eot_id,
            "special_ids": dict(tok.special_ids)}


def readme(model_type: str, architecture: str, layout: dict) -> str:
    tok = get_tokenizer(layout["tokenizer"], **layout["tokenizer_params"])
    doc = inspect.getdoc(inspect.getmodule(type(tok))) or ""
    specials = ", ".join(f"{k} = {v}" for k, v in layout["special_ids"].items())
    return (f"# amtrain export ({architecture}, model_type {model_type})\n\n"
            f"Load with `transformers.AutoModel*.from_pretrained(this folder)`; no custom code.\n\n"
            f"Token ids: amtrain's `{layout['tokenizer']}` vocabulary "
            f"(params {json.dumps(layout['tokenizer_params'])}): {layout['vocab_size']} ids, end of text "
            f"{layout['eot_id']}; specials: {specials}. transformers has no tokenizer for it: encode with "
            "amtrain (`amtrain rollout`, `amtrain.tokens.get_tokenizer`). Ids at and above vocab_size are "
            "padding rows (generation_config.json suppresses them). The same layout is in config.json under "
            "\"amtrain\".\n\n## Id layout\n\n```\n" + doc + "\n```\n")
