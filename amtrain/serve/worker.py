"""Workers: take jobs from a stream of the queue, run them, write results once.

The loop (`Worker.run`): claim the messages of dead workers idle past the visibility timeout
(XAUTOCLAIM), read new ones (XREADGROUP), handle them as a batch, acknowledge. While a batch
runs a thread writes the heartbeat (1 s) and re-claims the batch's own messages (XCLAIM JUSTID)
so a slow batch is never taken from a live worker. Each delivery counts an attempt in the job's
hash: past `max_attempts` (a worker crashed on it each time, or it raised each time) the job goes
to the dead-letter stream with its last error. A payload that fails validation is a failed job
at once, with the reason. SIGTERM / SIGINT: the current batch finishes, then the loop ends.

`GenerateWorker` runs rollouts (`amtrain.rollout`); `CodecWorker` encodes audio prompts (with
prep-audio's structural analysis in the same pass) and decodes generated codes to WAV.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import tempfile
import threading
import time
import traceback
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from amtrain.errors import UserError
from amtrain.serve.jobs import AUDIO_SUFFIXES, InvalidJob, Limits, batch_key, validate
from amtrain.serve.queue import GROUP, Queue, pack, s, unpack

HEARTBEAT_S = 1.0
FORGET_S = 3600.0  # a heartbeat this old is of a worker long gone: dropped when a worker starts


class Worker:
    kind = ""
    stages: tuple[str, ...] = ()

    def __init__(self, queue: Queue, batch_size: int = 8, visibility: float = 60.0, max_attempts: int = 3,
                 limits: Limits | None = None, name: str | None = None, block_ms: int = 1000):
        self.q = queue
        self.batch_size = max(1, batch_size)
        self.visibility = visibility
        self.max_attempts = max_attempts
        self.limits = limits or Limits()
        self.consumer = name or f"{socket.gethostname()}-{os.getpid()}-{self.kind}"
        self.block_ms = block_ms
        self.stopping = False
        self.started = time.time()
        self.jobs_done = 0
        self.batches = 0
        self.recent: deque[float] = deque()
        self.in_flight: list[str] = []
        self.last_batch = 0
        self.rows = 0
        """Jobs in the model batch running now (or last)."""
        self.largest = 0
        """Most jobs one model batch has held."""
        self.info: dict[str, Any] = {}

    # -- the loop --------------------------------------------------------------------------
    def stop(self, *_) -> None:
        self.stopping = True

    def install_signals(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def run(self, idle_exit: float | None = None, max_batches: int | None = None) -> None:
        """Until stopped (or idle for `idle_exit` seconds, or after `max_batches`)."""
        import redis

        self.q.ensure_group(self.kind)
        workers = self.q.key("workers")
        for name, beat in self.q.r.hgetall(workers).items():
            if time.time() - float(json.loads(beat)["time"]) > FORGET_S:
                self.q.r.hdel(workers, name)
        done = threading.Event()
        keeper = threading.Thread(target=self._keep_alive, args=(done,), daemon=True)
        keeper.start()
        idle_since = time.time()
        try:
            while not self.stopping:
                try:
                    msgs = self.take()
                except redis.ConnectionError as e:  # Redis restarting, the tunnel down: wait and go on
                    print(f"serve {self.kind}: {self.consumer}: Redis unreachable ({e}); retrying in 2 s", flush=True)
                    time.sleep(2)
                    continue
                except redis.ResponseError as e:
                    if "NOGROUP" not in str(e):
                        raise
                    self.q.ensure_group(self.kind)  # a Redis restarted without its data
                    continue
                if not msgs:
                    if idle_exit is not None and time.time() - idle_since > idle_exit:
                        break
                    continue
                self.in_flight = [m for m, _ in msgs]
                self.last_batch = len(msgs)
                try:
                    self.handle(msgs)
                except redis.ConnectionError as e:  # its unacknowledged jobs are claimed again later
                    print(f"serve {self.kind}: {self.consumer}: Redis lost mid-batch ({e}); its jobs will be "
                          "taken again after the visibility timeout", flush=True)
                self.in_flight = []
                self.batches += 1
                idle_since = time.time()
                if max_batches is not None and self.batches >= max_batches:
                    break
        finally:
            done.set()
            keeper.join()
            try:
                self.q.r.hdel(self.q.key("workers"), self.consumer)
            except redis.ConnectionError:
                pass

    def take(self) -> list[tuple[str, dict]]:
        """Up to batch_size (message id, job) pairs ready to run: dead workers' jobs first."""
        stream = self.q.stream(self.kind)
        _, claimed, _ = self.q.r.xautoclaim(stream, GROUP, self.consumer, min_idle_time=int(self.visibility * 1000),
                                            start_id="0-0", count=self.batch_size)
        msgs = [(s(i), f) for i, f in claimed if f]
        if len(msgs) < self.batch_size:
            got = self.q.r.xreadgroup(GROUP, self.consumer, {stream: ">"}, count=self.batch_size - len(msgs),
                                      block=None if msgs else self.block_ms)
            msgs += [(s(i), f) for _, entries in got or [] for i, f in entries]
        ready = []
        for msg_id, fields in msgs:
            job = self._start(msg_id, s(fields[b"job"]))
            if job is not None:
                ready.append((msg_id, job))
        return ready

    def _start(self, msg_id: str, job_id: str) -> dict | None:
        job = self.q.job(job_id)
        if not job or job.get("stage") not in self.stages:  # a duplicate of a job that moved on
            self.q.r.xack(self.q.stream(self.kind), GROUP, msg_id)
            return None
        attempts = int(self.q.r.hincrby(self.q.key("job", job_id), "attempts", 1))
        job["attempts"] = attempts
        if attempts > self.max_attempts:
            why = job.get("error") or "the worker running it died (killed or out of memory)"
            self.q.dead_letter(self.kind, msg_id, job_id, self.consumer, job["stage"], attempts - 1,
                               f"failed {attempts - 1} times; last: {why}")
            return None
        self.q.r.hset(self.q.key("job", job_id), mapping={"status": "running", "started": time.time(),
                                                          "worker": self.consumer})
        return job

    def _keep_alive(self, done: threading.Event) -> None:
        last_claim = 0.0
        import redis

        while True:
            try:
                self.heartbeat()
                now = time.time()
                if self.in_flight and now - last_claim > self.visibility / 3:
                    self.q.r.xclaim(self.q.stream(self.kind), GROUP, self.consumer, 0, list(self.in_flight),
                                    justid=True)
                    last_claim = now
            except redis.ConnectionError:
                pass  # the main loop says so and waits
            if done.wait(HEARTBEAT_S):
                return

    def heartbeat(self) -> None:
        now = time.time()
        while self.recent and now - self.recent[0] > 60:
            self.recent.popleft()
        span = max(1e-9, min(60.0, now - self.started))
        beat = {"kind": self.kind, "host": socket.gethostname(), "pid": os.getpid(), "time": now,
                "started": self.started, "jobs": self.jobs_done, "batches": self.batches,
                "jobs_per_s": len(self.recent) / span, "in_flight": len(self.in_flight),
                "batch": self.last_batch, "rows": self.rows, "largest": self.largest, "stopping": self.stopping} | self.info
        self.q.r.hset(self.q.key("workers"), self.consumer, json.dumps(beat))

    # -- outcomes --------------------------------------------------------------------------
    def _ack(self, msg_id: str) -> None:
        self.q.r.xack(self.q.stream(self.kind), GROUP, msg_id)
        self.jobs_done += 1
        self.recent.append(time.time())

    def complete(self, msg_id: str, job: dict, files: dict[str, bytes], meta: dict) -> None:
        meta = meta | {"seconds": time.time() - float(job.get("submitted", time.time())), "attempts": job["attempts"]}
        self.q.finish(job["id"], self.consumer, "finished", meta, files)
        self._ack(msg_id)

    def fail(self, msg_id: str, job: dict, reason: str) -> None:
        self.q.finish(job["id"], self.consumer, "failed", {"error": reason, "stage": job.get("stage", "")}, {})
        self._ack(msg_id)

    def forward(self, msg_id: str, job: dict, to: str, fields: dict[str, Any]) -> None:
        self.q.advance(job["id"], job["stage"], to, fields)
        self._ack(msg_id)

    def error(self, msg_id: str, job: dict, exc: BaseException) -> None:
        """An unexpected error: retried (a fresh delivery) until max_attempts, then dead-lettered."""
        why = f"{type(exc).__name__}: {exc}"
        traceback.print_exception(exc)
        if job["attempts"] >= self.max_attempts:
            self.q.dead_letter(self.kind, msg_id, job["id"], self.consumer, job["stage"], job["attempts"],
                               f"failed {job['attempts']} times; last: {why}")
        else:
            self.q.retry(self.kind, msg_id, job["id"], why, job["stage"])

    def guarded(self, msg_id: str, job: dict, fn) -> None:
        """Run fn(); its UserError fails the job, anything else counts an attempt."""
        try:
            fn()
        except UserError as e:
            self.fail(msg_id, job, str(e))
        except Exception as e:  # noqa: BLE001 - a job's fault never ends the worker
            self.error(msg_id, job, e)

    def handle(self, msgs: list[tuple[str, dict]]) -> None:
        for msg_id, job in msgs:
            self.rows, self.largest = 1, max(self.largest, 1)
            self.guarded(msg_id, job, lambda m=msg_id, j=job: self.handle_one(m, j))

    def handle_one(self, msg_id: str, job: dict) -> None:
        raise NotImplementedError


# ------------------------------------------------------------------------- generation
class GenerateWorker(Worker):
    """Rollouts of one checkpoint; concurrent compatible jobs run as one batch."""

    kind = "generate"
    stages = ("generate",)

    def __init__(self, queue: Queue, ckpt: str | Path, device: str = "cpu", **kw):
        from amtrain.rollout.load import load_rollout_model

        super().__init__(queue, **kw)
        self.rm = load_rollout_model(ckpt, device=device)
        self.info = {"checkpoint": str(ckpt), "modality": self.rm.modality.name, "family": self.rm.family.name}
        self.q.r.set(self.q.key("model"), json.dumps({"checkpoint": str(ckpt), "tokenizer": self.rm.meta["tokenizer"],
                                                      "tokenizer_params": self.rm.meta.get("tokenizer_params", {}),
                                                      "modality": self.rm.modality.name}))

    def prepare(self, job: dict):
        """-> (RolloutConfig, prompt tape) or None when the job went to the codec worker first."""
        from amtrain.rollout import defaults
        from amtrain.rollout.run import RolloutConfig, read_prompt

        options = json.loads(job.get("options") or "{}")
        prompt = job.get("prompt")
        name = job.get("prompt_name")
        kwargs = validate(options, name, len(prompt or b""), self.limits)
        cfg = RolloutConfig(**kwargs, frame_rate=float(job["frame_rate"]) if job.get("frame_rate") else None)
        if job.get("codes") is not None:  # encoded by the codec worker
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "prompt.npz"
                path.write_bytes(job["codes"])
                tape = read_prompt(self.rm, path, cfg)
            cfg.priorities = [tuple(p) for p in json.loads(job.get("priorities") or "[]")]
            return cfg, tape
        if prompt is not None and self.rm.modality.needs_codec and s(name).lower().endswith(AUDIO_SUFFIXES):
            return None
        if prompt is None:
            tape, _, _ = defaults.heldout_prompt(self.rm, cfg)
            return cfg, tape
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"prompt{Path(s(name)).suffix.lower()}"
            path.write_bytes(prompt)
            try:
                return cfg, read_prompt(self.rm, path, cfg)
            except UserError as e:  # name the prompt as the client sent it, not the worker's copy
                raise UserError(str(e).replace(str(path), f"prompt {name}")) from None

    def batch_tape(self, cfg, tape):
        """The (T,) tape a job adds to a batch, or None if it runs alone: plain-id continuation
        (text, ids) of a left-to-right model, one sample; equally long tapes of jobs with the
        same options (seeds aside: one generator a row) stack into one (B, T) batch through the
        modality's own continuation."""
        from amtrain.modalities.base import Modality

        if not (cfg.mode == "continue" and cfg.num_samples == 1 and self.rm.family.left_to_right
                and type(self.rm.modality).continue_tape is Modality.continue_tape):
            return None
        tape = self.rm.modality.continuation_tape(self.rm, tape)
        return tape if isinstance(tape, np.ndarray) and tape.ndim == 1 else None

    def handle(self, msgs: list[tuple[str, dict]]) -> None:
        from dataclasses import replace

        groups: dict[str, list[tuple[str, dict, Any, Any]]] = {}
        for msg_id, job in msgs:
            try:
                prepared = self.prepare(job)
                if prepared is None:
                    self.forward(msg_id, job, "encode", {})
                    continue
                cfg, tape = prepared
                row = self.batch_tape(cfg, tape)
            except UserError as e:
                self.fail(msg_id, job, str(e))
                continue
            except Exception as e:  # noqa: BLE001
                self.error(msg_id, job, e)
                continue
            if row is not None:
                tape = row
                key = batch_key(json.loads(job.get("options") or "{}"), row.shape)
            else:
                key = f"alone:{msg_id}"
            groups.setdefault(key, []).append((msg_id, job, cfg, tape))
        for group in groups.values():
            self.rows = len(group)
            if len(group) > 1:
                cfg = group[0][2]
                if cfg.seed is not None:  # each row its own job's seed: the sample it gets alone
                    cfg = replace(cfg, row_seeds=tuple(int(g[2].seed) for g in group))
                try:
                    rows = self.rm.modality.continue_tape(self.rm, np.stack([g[3] for g in group]), cfg, 1)
                except Exception:  # noqa: BLE001 - run them one by one: only the bad one fails
                    rows = None
                if rows is not None:
                    self.largest = max(self.largest, len(group))
                    for (msg_id, job, cfg, tape), row in zip(group, rows, strict=True):
                        self.guarded(msg_id, job, lambda m=msg_id, j=job, c=cfg, t=tape, r=row: self.write(m, j, c, t, [r]))
                    continue
            for msg_id, job, cfg, tape in group:
                self.largest = max(self.largest, 1)
                self.guarded(msg_id, job, lambda m=msg_id, j=job, c=cfg, t=tape: self.run_one(m, j, c, t))

    def run_one(self, msg_id: str, job: dict, cfg, tape) -> None:
        from dataclasses import replace

        from amtrain.rollout.run import infill_tape, rollout

        ranges = [tuple(r) for r in json.loads(job.get("infill_ranges") or "[]")]
        if cfg.mode == "infill" and ranges:  # a prefix + recurring postfix prompt: each gap in turn
            results = []
            for n in range(cfg.num_samples):
                out = tape
                for i, r in enumerate(ranges):
                    one = replace(cfg, infill_range=r, seed=None if cfg.seed is None else cfg.seed + 1000 * n)
                    out = infill_tape(self.rm, out, one, 1, seed_offset=i)[0]
                results.append(out)
        else:
            results = rollout(self.rm, tape, cfg)
        self.write(msg_id, job, cfg, tape, results)

    def write(self, msg_id: str, job: dict, cfg, tape, results: list) -> None:
        from amtrain.rollout.run import summaries, write_tapes

        lines = [line for line, _ in summaries(self.rm, tape, results, cfg)]
        warnings = [w for _, ws in summaries(self.rm, tape, results, cfg) for w in ws]
        with tempfile.TemporaryDirectory() as tmp:
            paths = write_tapes(self.rm, results, Path(tmp), prompt=tape)
            files = {p.name: p.read_bytes() for p in paths}
        meta = {"lines": lines, "warnings": warnings, "modality": self.rm.modality.name}
        if self.rm.modality.needs_codec:  # the codec worker writes the .wav
            import io

            buf = io.BytesIO()
            arrays: dict[str, Any] = {f"sample_{i}": np.asarray(r) for i, r in enumerate(results)}
            np.savez(buf, **arrays)
            self.forward(msg_id, job, "decode", {"out": buf.getvalue(), "outfiles": pack(files),
                                                 "meta": json.dumps(meta)})
            return
        self.complete(msg_id, job, files, meta)


# ------------------------------------------------------------------------- codec
class CodecWorker(Worker):
    """Audio prompts -> codes plus prep-audio's chunk analysis; generated codes -> WAV."""

    kind = "codec"
    stages = ("encode", "decode")

    def __init__(self, queue: Queue, codec_path: str | Path | None = None, codec_model: str = "24khz", **kw):
        from amtrain.codec import load_codec

        super().__init__(queue, **kw)
        self.codec = load_codec(codec_path, codec_model)
        self.info = {"codec": self.codec.codec_id, "sample_rate": self.codec.sample_rate}

    def handle_one(self, msg_id: str, job: dict) -> None:
        if job["stage"] == "encode":
            self.encode(msg_id, job)
        else:
            self.decode(msg_id, job)

    def encode(self, msg_id: str, job: dict) -> None:
        from amtrain.modalities.audio import bandwidth_for
        from amtrain.prep.audio import (
            AudioPrepConfig,
            BadAudio,
            Times,
            encode_stream,
            geometry,
            probe,
            read_blocks,
        )

        options = json.loads(job.get("options") or "{}")
        prompt, name = job.get("prompt"), s(job.get("prompt_name") or "")
        validate(options, name or None, len(prompt or b""), self.limits)
        if prompt is None or not name.lower().endswith(AUDIO_SUFFIXES):
            raise InvalidJob(f"prompt {name or '(none)'}: the codec worker encodes audio files ({', '.join(AUDIO_SUFFIXES)})")
        model = self.q.r.get(self.q.key("model"))
        if model is None:
            raise InvalidJob(f"queue {self.q.name}: no generate worker has said which checkpoint it serves; start "
                             "`amtrain serve generate CKPT` on this queue first")
        k = int(json.loads(model)["tokenizer_params"]["num_codebooks"])
        cfg = AudioPrepConfig(bandwidth=bandwidth_for(self.codec, k))
        times = Times()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"prompt{Path(name).suffix.lower()}"
            path.write_bytes(prompt)
            try:
                found = probe(path, times)
                enc = encode_stream(read_blocks(path, self.codec.sample_rate, self.codec.channels, times, found.frames),
                                    self.codec, cfg, geometry(self.codec, cfg), times)
            except BadAudio as e:
                raise InvalidJob(f"prompt {name}: {e}") from None
        codes = enc.codes.astype(np.int64)
        chunks = [{"start_frame": a, "end_frame": b} | {c: float(enc.chunks[c][i]) for c in
                                                         ("flux", "rms_db", "novelty", "stability", "priority")}
                  for i, (a, b) in enumerate(enc.bounds)]
        priorities: list = []
        ranges: list = []
        rank = options.get("priority_rank")
        if rank is not None:
            order = sorted(range(len(chunks)), key=lambda i: -chunks[i]["priority"])
            mode = options.get("mode", "continue")
            need = rank + (2 if mode == "infill" else 1)
            if need > len(order):
                raise InvalidJob(f"option priority_rank={rank}: the file has {len(order)} chunks of "
                                 f"{cfg.chunk_seconds:g} s; {mode} from rank {rank} needs {need}")
            best = chunks[order[rank]]
            if mode == "alternate":  # the whole file; alternate re-generates the weakest chunks
                priorities = [(c["start_frame"], c["end_frame"], c["priority"]) for c in chunks]
            elif mode == "infill":  # prefix: this chunk; postfix: the next best, recurring; gaps in-filled
                codes, ranges = self.prefix_postfix(codes, best, chunks[order[rank + 1]], options)
            else:
                codes = codes[:, best["start_frame"]:best["end_frame"]]
        import io

        buf = io.BytesIO()
        np.savez(buf, codes=codes)
        self.forward(msg_id, job, "generate", {"codes": buf.getvalue(), "frame_rate": self.codec.frame_rate,
                                               "priorities": json.dumps(priorities), "analysis": json.dumps(chunks),
                                               "infill_ranges": json.dumps(ranges)})

    def prefix_postfix(self, codes: np.ndarray, pre: dict, post: dict, options: dict):
        """The seed's out-of-distribution prompt: the prefix chunk, then (gap, postfix chunk)
        `postfix_repeat` times; -> (codes, the gaps in seconds). A gap is `length` seconds (with
        `seconds`) or tokens / K frames long; its frames are placeholders the in-fill replaces."""
        k = codes.shape[0]
        length = float(options.get("length", 256))
        gap = max(1, round(length * self.codec.frame_rate) if options.get("seconds") else int(length) // k)
        a = codes[:, pre["start_frame"]:pre["end_frame"]]
        b = codes[:, post["start_frame"]:post["end_frame"]]
        pieces, ranges, pos = [a], [], a.shape[1]
        for _ in range(int(options.get("postfix_repeat", 1))):
            pieces += [np.zeros((k, gap), codes.dtype), b]
            ranges.append((pos / self.codec.frame_rate, (pos + gap) / self.codec.frame_rate))
            pos += gap + b.shape[1]
        return np.concatenate(pieces, axis=1), ranges

    def decode(self, msg_id: str, job: dict) -> None:
        import io

        import soundfile as sf

        files = unpack(job["outfiles"])
        with np.load(io.BytesIO(job["out"]), allow_pickle=False) as z:
            for name in z.files:
                wave = self.codec.decode(z[name])  # (C, T * hop)
                buf = io.BytesIO()
                sf.write(buf, wave.T, self.codec.sample_rate, format="WAV", subtype="PCM_16")
                files[f"{name}.wav"] = buf.getvalue()
        meta = json.loads(job.get("meta") or "{}")
        if job.get("analysis"):
            meta["analysis"] = json.loads(job["analysis"])
        self.complete(msg_id, job, files, meta)
