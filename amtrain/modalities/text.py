"""Text: tiktoken gpt2 and ascii datasets. Tapes are ids (T,); prompts are text (split at
`--gap-marker` for in-filling) or id files; outputs are the decoded .txt plus the ids.

Every training document starts with the tokenizer's end-of-text id (prep-text), so a
left-to-right model's prompt does too, and it is cut off again when the result is written.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import numpy as np

from amtrain.fileio import write_bytes_atomic
from amtrain.modalities.base import (
    Modality,
    RolloutModel,
    check_ids,
    is_id_text,
    read_ids,
    save_npy,
    split_gaps,
)
from amtrain.registry import register_modality
from amtrain.tokens import TextTokenizer


class TextModality(Modality):
    name = "text"
    tokenizers = ("gpt2", "ascii")
    prompt_files = ".txt text (or ids), .npy ids"

    def document_prefix(self, tokenizer) -> list[int]:
        return [tokenizer.eot_id]

    def training_prompt(self, text: str):
        """A prompt string, the text of a .txt file, or the ids of a .npy."""
        path = Path(text)
        if path.suffix == ".npy" and path.is_file():
            return np.load(path).astype(np.int64)
        return path.read_text() if path.suffix == ".txt" and path.is_file() else text

    def hook_tape(self, rm: RolloutModel, prompt, cfg, codec=None):
        if isinstance(prompt, str):
            assert isinstance(rm.tokenizer, TextTokenizer), rm.tokenizer
            prefix = self.document_prefix(rm.tokenizer) if rm.family.left_to_right else []
            return np.array(prefix + rm.tokenizer.encode(prompt), np.int64), len(prefix)
        return prompt, 0

    def read_prompt(self, rm: RolloutModel, path: Path, cfg, codec=None) -> list[np.ndarray]:
        """Text (or an id file) -> token segments split at gap markers (one segment: no gap)."""
        tok = rm.tokenizer
        assert isinstance(tok, TextTokenizer), tok
        if path.suffix == ".npy" or is_id_text(path):
            return split_gaps(check_ids(read_ids(path), tok.vocab_size, path))
        return [np.array(tok.encode(part), np.int64) for part in path.read_text().split(cfg.gap_marker)]

    def write_tape(self, rm: RolloutModel, tape, stem: Path, codec=None, prompt=None) -> list[Path]:
        tok = rm.tokenizer
        ids = np.asarray(tape, np.int64)
        body = ids[1:] if ids.size and ids[0] == tok.eot_id else ids  # the document-start header
        write_bytes_atomic(stem.with_suffix(".txt"), tok.decode(body.tolist()).encode())
        return [stem.with_suffix(".txt"), save_npy(ids, stem)]

    def units(self, tokenizer, ids: np.ndarray) -> tuple[str, list]:
        """Words: the decoded text (end-of-text ids dropped) split at whitespace."""
        ids = np.asarray(ids, np.int64)
        return "words", tokenizer.decode(ids[ids != tokenizer.eot_id].tolist()).split()

    def sample_command(self, run_dir: str, dataset, split: str, codec_path: str) -> str:
        return f'python -m amtrain sample {shlex.quote(run_dir)} --prompt "In the beginning"'


TEXT = register_modality(TextModality())
