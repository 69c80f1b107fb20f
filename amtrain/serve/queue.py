"""The jobs in Redis: streams with consumer groups, job hashes, results written once.

Keys of a queue NAME (all under `amtrain:NAME:`):

    stream:generate, stream:codec   work to do; one consumer group per stream ("workers")
    job:<id>        hash: options (JSON), prompt + prompt_name, status, stage, attempts, error,
                    submitted / started / finished times, worker; between stages the codes
                    (`codes`, `out`) travel here
    jobs            sorted set: id by submit time (the client and the web page list it)
    result:<id>     hash: `meta` (JSON: status, lines, error, worker, seconds) and `file:<name>`
                    -> bytes; written once (a Lua script renames a worker's private copy into
                    place only when no result is there, so a job re-run after a worker died
                    cannot finish twice)
    done            stream: one entry {job, status} per result written (what `client fetch` reads)
    dead            dead-letter stream: {job, stage, attempts, error} for jobs that failed
                    `max_attempts` times
    workers         hash: consumer -> JSON heartbeat (kind, host, pid, time, jobs, jobs/s, batch)
    stats           hash: finished / failed / dead counters
    model           JSON of the checkpoint the generate workers serve (tokenizer, params, modality)

A job moves encode (codec) -> generate -> decode (codec) as its prompt and modality need; each
move is guarded by the stage it leaves, so a duplicate delivery cannot move it twice.
"""

from __future__ import annotations

import io
import json
import time
import uuid
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from amtrain.errors import UserError

GROUP = "workers"
STAGE_STREAM = {"encode": "codec", "generate": "generate", "decode": "codec"}

_FINISH = """
-- KEYS: tmp result, result, job, done stream, stats, dead stream;
-- ARGV: id, status, time, worker, error, stage, attempts
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('DEL', KEYS[1])
  return 0
end
redis.call('RENAME', KEYS[1], KEYS[2])
redis.call('HSET', KEYS[3], 'status', ARGV[2], 'stage', 'done', 'finished', ARGV[3], 'worker', ARGV[4], 'error', ARGV[5])
redis.call('HDEL', KEYS[3], 'codes', 'out', 'outfiles')
redis.call('XADD', KEYS[4], '*', 'job', ARGV[1], 'status', ARGV[2])
redis.call('HINCRBY', KEYS[5], ARGV[2], 1)
if ARGV[2] == 'dead' then
  redis.call('XADD', KEYS[6], '*', 'job', ARGV[1], 'stage', ARGV[6], 'attempts', ARGV[7], 'error', ARGV[5])
end
return 1
"""

_ADVANCE = """
-- KEYS: job, next stream; ARGV: id, stage it leaves, next stage, then field, value pairs
if redis.call('HGET', KEYS[1], 'stage') ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'stage', ARGV[3], 'attempts', 0, 'status', 'queued')
for i = 4, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('XADD', KEYS[2], '*', 'job', ARGV[1])
return 1
"""

_RETRY = """
-- KEYS: stream, job; ARGV: group, message id, job id, error, stage
if redis.call('HGET', KEYS[2], 'stage') ~= ARGV[5] then
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
  return 0
end
redis.call('HSET', KEYS[2], 'error', ARGV[4], 'status', 'queued')
redis.call('XADD', KEYS[1], '*', 'job', ARGV[3])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
return 1
"""


def s(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def safe_url(url: str) -> str:
    """The URL with its password replaced by ***, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[1]}"))


def connect(url: str) -> Any:
    """A redis-py client for `url` (redis://[user:password@]host:port/db, rediss:// for TLS,
    unix://), checked with a PING; a failure is one line naming the URL."""
    import redis

    try:
        r = redis.Redis.from_url(url, health_check_interval=30, socket_connect_timeout=5)
        r.ping()
    except ValueError as e:
        raise UserError(f"--redis {safe_url(url)}: not a Redis URL ({e}); write redis://[user:password@]host:6379/0 "
                        "or rediss://... for TLS") from None
    except redis.AuthenticationError as e:
        raise UserError(f"--redis {safe_url(url)}: authentication failed ({e}); put the password (and ACL user) in "
                        "the URL: redis://user:password@host:6379/0") from None
    except redis.ResponseError as e:
        if "NOAUTH" in str(e) or "WRONGPASS" in str(e):
            raise UserError(f"--redis {safe_url(url)}: the server wants a password ({e}); put it in the URL: "
                            "redis://:password@host:6379/0") from None
        raise
    except redis.ConnectionError as e:
        if "CERTIFICATE_VERIFY_FAILED" in str(e):
            raise UserError(f"--redis {safe_url(url)}: the server's TLS certificate is not trusted ({e}); name its CA: "
                            "rediss://host:6379/0?ssl_ca_certs=/path/ca.pem") from None
        raise UserError(f"--redis {safe_url(url)}: cannot reach Redis ({e}); start redis-server there, or open an "
                        "ssh tunnel: ssh -N -L 6379:localhost:6379 user@gpu-node") from None
    return r


def pack(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    arrays: dict[str, Any] = {k: np.frombuffer(v, np.uint8) for k, v in files.items()}
    np.savez(buf, **arrays)
    return buf.getvalue()


def unpack(data: bytes) -> dict[str, bytes]:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k].tobytes() for k in z.files}


class Queue:
    """One named queue in one Redis."""

    def __init__(self, url: str, name: str = "default"):
        self.url = url
        self.name = name
        self.r = connect(url)
        self.prefix = f"amtrain:{name}:"
        self._finish = self.r.register_script(_FINISH)
        self._advance = self.r.register_script(_ADVANCE)
        self._retry = self.r.register_script(_RETRY)

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def stream(self, kind: str) -> str:
        return self.key("stream", kind)

    def ensure_group(self, kind: str) -> None:
        import redis

        try:
            self.r.xgroup_create(self.stream(kind), GROUP, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    # -- client side -----------------------------------------------------------------------
    def submit(self, options: dict, prompt: bytes | None = None, prompt_name: str | None = None,
               stage: str = "generate") -> str:
        job_id = uuid.uuid4().hex[:16]
        now = time.time()
        fields: dict[str, Any] = {"id": job_id, "options": json.dumps(options), "status": "queued", "stage": stage,
                                  "attempts": 0, "submitted": now, "error": ""}
        if prompt is not None:
            fields.update(prompt=prompt, prompt_name=prompt_name or "prompt.txt")
        self.ensure_group(STAGE_STREAM[stage])
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(self.key("job", job_id), mapping=fields)
        pipe.zadd(self.key("jobs"), {job_id: now})
        pipe.xadd(self.stream(STAGE_STREAM[stage]), {"job": job_id})
        pipe.execute()
        return job_id

    def job(self, job_id: str) -> dict[str, Any]:
        raw = self.r.hgetall(self.key("job", job_id))
        out: dict[str, Any] = {}
        for k, v in raw.items():
            k = s(k)
            out[k] = v if k in ("prompt", "codes", "out", "outfiles") else s(v)
        return out

    def result(self, job_id: str) -> tuple[dict, dict[str, bytes]] | None:
        raw = self.r.hgetall(self.key("result", job_id))
        if not raw:
            return None
        meta = json.loads(raw.pop(b"meta", b"{}"))
        files = {s(k)[len("file:"):]: v for k, v in raw.items() if s(k).startswith("file:")}
        return meta, files

    def meta(self, job_id: str) -> dict | None:
        """The result's meta alone (no file bytes), or None before it is written."""
        raw = self.r.hget(self.key("result", job_id), "meta")
        return None if raw is None else json.loads(raw)

    def job_ids(self, newest: int = 200) -> list[str]:
        return [s(x) for x in self.r.zrevrange(self.key("jobs"), 0, newest - 1)]

    def done(self, after: str = "0", block_ms: int | None = None, count: int = 1000) -> list[tuple[str, str, str]]:
        """(entry id, job id, status) of results written after entry `after`."""
        got = self.r.xread({self.key("done"): after}, count=count, block=block_ms)
        return [(s(eid), s(f[b"job"]), s(f[b"status"])) for _, entries in got or [] for eid, f in entries]

    def dead(self) -> list[dict[str, str]]:
        return [{s(k): s(v) for k, v in f.items()} | {"entry": s(eid)} for eid, f in self.r.xrange(self.key("dead"))]

    def stats(self) -> dict[str, Any]:
        """Queue depth, in flight, finished / failed / dead, and each worker's heartbeat."""
        out: dict[str, Any] = {k: int(v) for k, v in ((s(k), v) for k, v in self.r.hgetall(self.key("stats")).items())}
        for kind in ("generate", "codec"):
            depth = pending = 0
            if self.r.exists(self.stream(kind)):
                for g in self.r.xinfo_groups(self.stream(kind)):
                    if s(g["name"]) == GROUP:
                        depth = int(g.get("lag") or 0)
                        pending = int(g["pending"])
            out[kind] = {"queued": depth, "in_flight": pending}
        now = time.time()
        workers = []
        for name, beat in sorted(self.r.hgetall(self.key("workers")).items()):
            w = json.loads(beat)
            w["name"] = s(name)
            w["age"] = now - float(w["time"])
            workers.append(w)
        out["workers"] = workers
        out["jobs"] = int(self.r.zcard(self.key("jobs")))
        return out

    # -- worker side -----------------------------------------------------------------------
    def finish(self, job_id: str, worker: str, status: str, meta: dict, files: dict[str, bytes]) -> bool:
        """Write the job's result once; False if another worker already did."""
        tmp = self.key("tmp", job_id, worker)
        mapping: dict[str, Any] = {"meta": json.dumps(meta | {"status": status, "worker": worker})}
        mapping.update({f"file:{k}": v for k, v in files.items()})
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(tmp)
        pipe.hset(tmp, mapping=mapping)
        pipe.execute()
        return bool(self._finish(keys=[tmp, self.key("result", job_id), self.key("job", job_id), self.key("done"),
                                       self.key("stats"), self.key("dead")],
                                 args=[job_id, status, time.time(), worker, meta.get("error", ""),
                                       meta.get("stage", ""), meta.get("attempts", 0)]))

    def advance(self, job_id: str, leaving: str, to: str, fields: dict[str, Any]) -> bool:
        self.ensure_group(STAGE_STREAM[to])
        args: list[Any] = [job_id, leaving, to]
        for k, v in fields.items():
            args += [k, v]
        return bool(self._advance(keys=[self.key("job", job_id), self.stream(STAGE_STREAM[to])], args=args))

    def retry(self, kind: str, msg_id: str, job_id: str, error: str, stage: str) -> None:
        self._retry(keys=[self.stream(kind), self.key("job", job_id)], args=[GROUP, msg_id, job_id, error, stage])

    def dead_letter(self, kind: str, msg_id: str, job_id: str, worker: str, stage: str, attempts: int,
                    error: str) -> None:
        self.finish(job_id, worker, "dead", {"error": error, "attempts": attempts, "stage": stage}, {})
        self.r.xack(self.stream(kind), GROUP, msg_id)
