"""The client side: submit jobs, fetch results into a folder.

`submit` sends the prompt file's bytes with the job (the workers may be on another machine);
an audio prompt goes to the codec worker first (encode), everything else to the generate
workers. `fetch` writes each finished job as OUT/<job id>/ (the files the rollout wrote plus
result.json) and remembers where it stopped in OUT/.fetched, so it can be run again.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from amtrain.errors import UserError
from amtrain.fileio import write_bytes_atomic, write_json_atomic, write_text_atomic
from amtrain.serve.jobs import AUDIO_SUFFIXES, Limits, validate
from amtrain.serve.queue import Queue


def submit(queue: Queue, options: dict, prompt: Path | None = None, text: str | None = None, count: int = 1) -> list[str]:
    """Job ids; `count` jobs with seeds seed, seed + 1, ... (one job when count is 1)."""
    data, name = None, None
    if prompt is not None and text is not None:
        raise UserError("give at most one of --prompt FILE and --text STRING")
    if prompt is not None:
        if not prompt.is_file():
            raise UserError(f"--prompt {prompt}: no such file")
        data, name = prompt.read_bytes(), prompt.name
    elif text is not None:
        data, name = text.encode(), "prompt.txt"
    validate(options, name, len(data or b""), Limits())  # the workers check again, with their limits
    stage = "encode" if name is not None and name.lower().endswith(AUDIO_SUFFIXES) else "generate"
    ids = []
    for i in range(count):
        opts = dict(options)
        if i and opts.get("seed") is not None:
            opts["seed"] = int(opts["seed"]) + i
        ids.append(queue.submit(opts, data, name, stage=stage))
    return ids


def write_result(queue: Queue, job_id: str, out: Path) -> tuple[str, list[Path]]:
    """(status, files written) of one job into out/<job id>/."""
    res = queue.result(job_id)
    if res is None:
        return "pending", []
    meta, files = res
    folder = out / job_id
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in sorted(files.items()):
        if "/" in name or name.startswith("."):
            continue  # names come from workers; never leave the folder
        write_bytes_atomic(folder / name, data)
        written.append(folder / name)
    write_json_atomic(folder / "result.json", meta)
    return str(meta.get("status")), written


def fetch(queue: Queue, out: Path, wait: bool = False, jobs: list[str] | None = None, timeout: float | None = None,
          echo=print) -> int:
    """Write the results not fetched yet; with `jobs`, those (waiting for them with `wait`);
    otherwise every result written since the last fetch into `out` (and, with `wait`, go on
    until interrupted or `timeout`, then return). Returns how many were written."""
    out.mkdir(parents=True, exist_ok=True)
    mark = out / ".fetched"
    after = mark.read_text().strip() if mark.is_file() and not jobs else "0"
    want = set(jobs or [])
    written = 0
    start = time.time()
    while True:
        if want:
            for job_id in sorted(want):
                status, files = write_result(queue, job_id, out)
                if status != "pending":
                    _say(echo, queue, job_id, status, files)
                    want.discard(job_id)
                    written += 1
            if not want or not wait:
                return written
            queue.done("$", block_ms=1000)
        else:
            entries = queue.done(after, block_ms=1000 if wait else None)
            for entry, job_id, _ in entries:
                status, files = write_result(queue, job_id, out)
                _say(echo, queue, job_id, status, files)
                written += 1
                after = entry
            if entries:
                write_text_atomic(mark, after)
            if not wait:
                return written
        if timeout is not None and time.time() - start > timeout:
            if not want:  # following every result: the timeout ends the watch
                return written
            raise UserError(f"--timeout {timeout}: {len(want) or 'no'} jobs still unfinished: {' '.join(sorted(want))}")


def _say(echo, queue: Queue, job_id: str, status: str, files: list[Path]) -> None:
    meta = queue.meta(job_id) or {}
    detail = meta.get("error") or "; ".join(meta.get("lines", []))
    echo(f"{job_id} {status}: {detail}")
    for w in meta.get("warnings", []):
        echo(f"  warning: {w}")
    for f in files:
        echo(f"  {f}")


def options_json(text: str | None) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as e:
        raise UserError(f"--options {text!r}: not JSON ({e})") from None
    if not isinstance(value, dict):
        raise UserError(f"--options {text!r}: a JSON object of rollout options")
    return value
