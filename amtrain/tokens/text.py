"""Text vocabularies.

gpt2  — tiktoken's GPT-2 BPE with GPT-2's exact ids: 50,257 ids, `<|endoftext|>` = 50256.
        Built offline from `assets/gpt2.tiktoken` shipped in the package (MIT, see
        assets/LICENSE-gpt2.tiktoken); never fetched from the network.
ascii — one id per byte of the UTF-8 text (0-255), then specials:
        256 `<|endoftext|>`, 257 `<|pad|>`. vocab_size 258.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np

ASSETS = Path(__file__).with_name("assets")
GPT2_RANKS_FILE = ASSETS / "gpt2.tiktoken"
ENDOFTEXT = "<|endoftext|>"
# tiktoken's r50k pattern (tiktoken_ext/openai_public.py): equivalent to GPT-2's original regex.
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


@cache
def gpt2_encoding(ranks_file: str = str(GPT2_RANKS_FILE)):
    """The tiktoken Encoding for GPT-2, read from a local ranks file."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    from amtrain.errors import UserError

    if not Path(ranks_file).is_file():
        raise UserError(
            f"{ranks_file}: GPT-2 vocabulary file missing; reinstall amtrain or pass the path "
            "of a gpt2.tiktoken ranks file"
        )
    ranks = load_tiktoken_bpe(ranks_file)
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PAT_STR,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: 50256},
        explicit_n_vocab=50257,
    )


class GPT2Tokenizer:
    name = "gpt2"
    vocab_size = 50257
    eot_id = 50256
    special_ids = {ENDOFTEXT: 50256}

    def __init__(self, ranks_file: str | None = None):
        self._ranks_file = ranks_file
        self.enc = gpt2_encoding(ranks_file or str(GPT2_RANKS_FILE))

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        return self.enc.encode_ordinary_batch(texts, num_threads=num_threads)

    def encode_batch_numpy(self, texts: list[str], num_threads: int = 1) -> list[np.ndarray]:
        """As `encode_batch`, but each result is tiktoken's uint32 buffer as an array: no Python
        int per token (the bulk of prep's overhead otherwise). Special-token text is encoded as
        plain text, exactly as `encode_ordinary` does."""
        from concurrent.futures import ThreadPoolExecutor

        def one(text: str) -> np.ndarray:
            return self.enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())

        with ThreadPoolExecutor(num_threads) as pool:
            return list(pool.map(one, texts))

    def decode(self, ids) -> str:
        return self.enc.decode([int(i) for i in ids], errors="replace")

    def params(self) -> dict:
        return {"ranks_file": self._ranks_file} if self._ranks_file else {}


class AsciiTokenizer:
    """Bytes 0-255 of the UTF-8 encoding, plus specials above them."""

    name = "ascii"
    vocab_size = 258
    eot_id = 256
    pad_id = 257
    special_ids = {ENDOFTEXT: 256, "<|pad|>": 257}

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        ids = np.asarray(ids, dtype=np.int64)
        return bytes(ids[ids < 256].astype(np.uint8)).decode("utf-8", errors="replace")

    def params(self) -> dict:
        return {}
