"""Audio tokens: EnCodec codes (K codebooks x T frames, values 0..1023) as one token stream.

Id layout (vocab_size = K*1024 + 2):
    k*1024 + c      code c of codebook k (0 <= k < K)
    K*1024          <eot>  document separator (prep puts one before every chunk)
    K*1024 + 1      <pad>  the empty slots of the delay pattern

Layouts (after audiocraft `modules/codebooks_patterns.py`; shown for K=3, T=2, `a_t b_t c_t`
the codes of codebooks 0, 1, 2 at frame t, `_` = <pad>):
    flatten   a0 b0 c0 a1 b1 c1            one token per step (T*K steps); the model predicts
                                           codebook k of frame t after all earlier ones
    parallel  a0 b0 c0 a1 b1 c1            same order; a step is one frame of K tokens
                                           (tokens_per_step = K), predicted together
    delay     a0 _ _ a1 b0 _ _ b1 c0 _ _ c1  MusicGen: codebook k delayed by k frames, steps of
                                           K tokens, (T+K-1)*K tokens
Every layout inverts exactly (`codes(encode(x)) == x`).
"""

from __future__ import annotations

import numpy as np

from amtrain.store.format import dtype_for_vocab

CODEBOOK_SIZE = 1024  # EnCodec codebook entries (amtrain.codec.CODEBOOK_SIZE; kept here so tokens need no torch)

LAYOUTS = ("flatten", "delay", "parallel")


class AudioTokenizer:
    name = "audio"

    def __init__(self, num_codebooks: int = 8, layout: str = "delay", codebook_size: int = CODEBOOK_SIZE):
        if layout not in LAYOUTS:
            raise ValueError(f"layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
        if num_codebooks < 1:
            raise ValueError(f"num_codebooks must be >= 1, got {num_codebooks}")
        self.num_codebooks = num_codebooks
        self.layout = layout
        self.codebook_size = codebook_size
        self.eot_id = num_codebooks * codebook_size
        self.pad_id = self.eot_id + 1
        self.vocab_size = self.eot_id + 2
        self.special_ids = {"eot": self.eot_id, "pad": self.pad_id}
        self.tokens_per_step = 1 if layout == "flatten" else num_codebooks

    def params(self) -> dict:
        return {"num_codebooks": self.num_codebooks, "layout": self.layout,
                "codebook_size": self.codebook_size}

    @property
    def dtype(self):
        return dtype_for_vocab(self.vocab_size)

    def _offsets(self) -> np.ndarray:
        return (np.arange(self.num_codebooks, dtype=np.int64) * self.codebook_size)[:, None]  # (K, 1)

    def encode(self, codes) -> np.ndarray:
        """codes (K, T) -> ids (N,) in this layout."""
        codes = np.asarray(codes, dtype=np.int64)
        k, t = codes.shape
        if k != self.num_codebooks:
            raise ValueError(f"codes have {k} codebooks, the tokenizer {self.num_codebooks}")
        if codes.size and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook_size})")
        ids = codes + self._offsets()  # (K, T)
        if self.layout == "delay":
            grid = np.full((k, t + k - 1), self.pad_id, dtype=np.int64)  # (K, T+K-1)
            for i in range(k):
                grid[i, i:i + t] = ids[i]
            ids = grid
        return ids.T.reshape(-1).astype(self.dtype)  # step-major

    def encode_batch(self, items, num_threads: int = 1) -> list[np.ndarray]:
        return [self.encode(c) for c in items]

    def codes(self, ids) -> np.ndarray:
        """Inverse of `encode`: ids (N,) -> codes (K, T). Raises ValueError on a malformed stream."""
        ids = np.asarray(ids, dtype=np.int64)
        k = self.num_codebooks
        if ids.size % k:
            raise ValueError(f"{ids.size} tokens is not a multiple of {k} codebooks")
        grid = ids.reshape(-1, k).T  # (K, S)
        if self.layout == "delay":
            t = grid.shape[1] - k + 1
            if t < 0:
                raise ValueError(f"a delay stream needs at least {k - 1} steps")
            expect_pad = np.ones_like(grid, dtype=bool)
            out = np.empty((k, t), dtype=np.int64)
            for i in range(k):
                out[i] = grid[i, i:i + t]
                expect_pad[i, i:i + t] = False
            if not np.all(grid[expect_pad] == self.pad_id):
                raise ValueError("delay stream has codes where <pad> belongs")
            grid = out
        codes = grid - self._offsets()
        if codes.size and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"token out of its codebook's range (codebook k must use ids k*{self.codebook_size}..)")
        return codes

    def split_documents(self, ids) -> list[np.ndarray]:
        """A stream with <eot> separators -> the code grids (K, T) between them."""
        ids = np.asarray(ids, dtype=np.int64)
        cuts = np.flatnonzero(ids == self.eot_id)
        bounds = np.concatenate([[-1], cuts, [ids.size]])
        return [self.codes(ids[a + 1:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a + 1]

    def decode(self, ids) -> str:
        """A short readable rendering, never an error: per <eot>-separated piece its frame
        count and first frames' codes, or, for a piece that is not whole steps of this layout
        (a slice, a model's raw output), its first tokens as `k:code` (`_` = <pad>)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        cuts = np.flatnonzero(ids == self.eot_id)
        bounds = np.concatenate([[-1], cuts, [ids.size]])
        pieces = [self._render(ids[a + 1:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        return " <eot> ".join(pieces).strip()

    def _render(self, ids: np.ndarray) -> str:
        if ids.size == 0:
            return ""
        try:
            codes = self.codes(ids)
        except ValueError:
            shown = " ".join(self._token(int(i)) for i in ids[: 3 * self.num_codebooks])
            more = " ..." if ids.size > 3 * self.num_codebooks else ""
            return f"<{self.layout} K={self.num_codebooks}, {ids.size} tokens, not whole frames> {shown}{more}"
        head = " ".join("(" + ",".join(str(int(c)) for c in codes[:, t]) + ")" for t in range(min(3, codes.shape[1])))
        more = " ..." if codes.shape[1] > 3 else ""
        return f"<{self.layout} K={self.num_codebooks} T={codes.shape[1]}> {head}{more}"

    def _token(self, i: int) -> str:
        if i == self.pad_id:
            return "_"
        if 0 <= i < self.eot_id:
            return f"{i // self.codebook_size}:{i % self.codebook_size}"
        return f"?{i}"
