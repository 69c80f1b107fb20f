"""`amtrain serve` / `amtrain client` against a real Redis (a private redis-server on a free
127.0.0.1 port, no persistence, stopped after the module): 100 jobs over two worker processes,
one SIGKILLed mid-batch, the other SIGTERMed mid-batch (it finishes the batch, exits 0), a third
taking over: every job finished exactly once; a poison job dead-lettered while the
workers go on; bad payloads failed with a reason; batched results (greedy, and sampled with a
different seed a job) equal one-by-one rollouts; an audio job codec -> generate -> codec with
a WAV of the right length and rate; the monitor; the results page in headless Chromium;
password and ACL-user URLs."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from amtrain.errors import UserError
from tests.audio_helpers import JOPLIN
from tests.rollout_helpers import REPO, codec_folder, decoder_ckpt, fim_decoder_ckpt

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None,
                                reason="needs Debian's redis-server (.ci/run installs it)")
PNG = b"\x89PNG\r\n\x1a\n"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_redis(folder: Path, *extra: str) -> tuple[subprocess.Popen, int]:
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder),
                             "--save", "", "--appendonly", "no", *extra], stdout=subprocess.DEVNULL)
    for _ in range(100):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.1):
                return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("redis-server did not start")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    proc, port = start_redis(tmp_path_factory.mktemp("redis"))
    yield f"redis://127.0.0.1:{port}/0"
    stop(proc)


@pytest.fixture(scope="module")
def text_ckpt(tmp_path_factory) -> Path:
    return decoder_ckpt(tmp_path_factory.mktemp("serve_ckpt") / "dec", "ascii", max_seq_len=64)


def env() -> dict:
    return os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def worker(ckpt: Path, url: str, queue: str, name: str, log: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "amtrain", "serve", "generate", str(ckpt), "--redis", url,
                             "--queue", queue, "--name", name, *extra], env=env(), cwd=REPO,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_for(cond, timeout: float, what: str):
    end = time.time() + timeout
    while time.time() < end:
        got = cond()
        if got:
            return got
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_two_workers_one_killed_one_stopped_every_job_once_poison_dead_lettered(redis_url, text_ckpt, tmp_path, capsys):
    from amtrain.serve import client
    from amtrain.serve.monitor import monitor
    from amtrain.serve.queue import GROUP, Queue
    from amtrain.serve.worker import GenerateWorker

    q = Queue(redis_url, "kill")
    args = ("--batch-size", "8", "--visibility", "2", "--max-attempts", "2")
    w1 = worker(text_ckpt, redis_url, "kill", "w1", tmp_path / "w1.log", *args)
    w2 = worker(text_ckpt, redis_url, "kill", "w2", tmp_path / "w2.log", *args)
    try:
        wait_for(lambda: q.r.hlen(q.key("workers")) == 2, 60, "both workers' heartbeats")
        monitor(q, once=True)
        shown = capsys.readouterr().out
        assert "workers: 2" in shown and "w1 generate alive" in shown and "w2 generate alive" in shown
        opts = {"length": 40, "seed": 0, "temperature": 1.0}
        prompts = ["In the beginning", "And God said, Let", "the waters"]  # three lengths: three kinds of batch
        ids = [client.submit(q, opts, text=prompts[i % 3])[0] for i in range(100)]
        poison = q.submit({"length": 8}, b"\x93NUMPY garbage", "prompt.npy")  # valid payload, unreadable prompt
        bad_mode = q.submit({"mode": "sing"}, b"hi", "prompt.txt")
        too_long = q.submit({"length": 10**9}, b"hi", "prompt.txt")
        unknown = q.submit({"lenght": 8}, b"hi", "prompt.txt")
        stream = q.stream("generate")
        # SIGKILL w1 while it holds a batch (its messages pending, unacknowledged)
        wait_for(lambda: q.r.xpending_range(stream, GROUP, "-", "+", 100, consumername="w1"), 60, "w1 to take a batch")
        w1.send_signal(signal.SIGKILL)
        w1.wait()
        orphans = q.r.xpending_range(stream, GROUP, "-", "+", 100, consumername="w1")
        assert orphans, "w1 was killed between batches; the kill must land mid-batch"
        # SIGTERM w2 while it holds a batch: it finishes that batch, acknowledges it, exits 0
        held = wait_for(lambda: q.r.xpending_range(stream, GROUP, "-", "+", 100, consumername="w2"), 60,
                        "w2 to take a batch")
        w2.send_signal(signal.SIGTERM)
        assert w2.wait(30) == 0 and "stopped after" in (tmp_path / "w2.log").read_text()
        assert not q.r.xpending_range(stream, GROUP, "-", "+", 100, consumername="w2")
        held_jobs = {f[b"job"].decode() for m in held for _, f in q.r.xrange(stream, m["message_id"], m["message_id"])}
        assert all(q.meta(j) is not None for j in held_jobs - {poison})  # the batch it held is done
        # a third worker (in this process) takes w1's orphans after the visibility timeout, and the rest
        w3 = GenerateWorker(q, text_ckpt, batch_size=8, visibility=2, max_attempts=2, name="w3")
        w3.run(idle_exit=4)
        assert w3.largest > 1  # equally long prompts ran as batches
        assert q.r.xlen(q.key("done")) >= 104
        time.sleep(0.5)  # a duplicate result would land now
        done = q.done("0")
        assert len(done) == 104
        status = {job: st for _, job, st in done}
        assert len(status) == 104, "a job finished twice"
        assert all(status[i] == "finished" for i in ids)
        assert status[poison] == "dead" and {status[bad_mode], status[too_long], status[unknown]} == {"failed"}
        dead = q.dead()
        assert [d["job"] for d in dead] == [poison] and "failed 2 times" in dead[0]["error"]
        reasons = {j: q.result(j)[0]["error"] for j in (bad_mode, too_long, unknown)}
        assert "sing" in reasons[bad_mode] and "limit" in reasons[too_long] and "lenght" in reasons[unknown]
        assert q.job(bad_mode)["attempts"] == "1"  # a bad payload is not retried
        for i in ids:
            meta, files = q.result(i)
            assert meta["status"] == "finished" and files["sample_0.txt"] and meta["lines"] == [
                f"+40 tokens (added), {41 + len(prompts[ids.index(i) % 3])} in all"]
        retried = [i for i in ids if q.result(i)[0]["attempts"] > 1]  # w1's orphans
        assert retried and {q.result(i)[0]["worker"] for i in retried} <= {"w2", "w3"}
        st = q.stats()
        assert (st["finished"], st["failed"], st["dead"]) == (100, 3, 1)
        assert q.r.xpending(stream, GROUP)["pending"] == 0
    finally:
        for w in (w1, w2):
            if w.poll() is None:
                w.kill()
                w.wait()


def test_batched_jobs_equal_one_by_one_rollouts_through_the_cli(redis_url, text_ckpt, tmp_path):
    """Greedy: a batch of equally long prompts gives each job what `rollout` gives it alone;
    `client submit` / `client fetch --job --wait` / `client monitor --once` as a user runs them."""
    from typer.testing import CliRunner

    from amtrain.cli import app
    from amtrain.rollout.run import RolloutConfig, rollout
    from amtrain.serve.queue import Queue
    from amtrain.serve.worker import GenerateWorker

    runner = CliRunner()
    url = ["--redis", redis_url, "--queue", "batch"]
    texts = ["abcd", "wxyz", "ab12", "Lord"]
    ids = []
    for t in texts:
        r = runner.invoke(app, ["client", "submit", "--text", t, "--length", "20", "--temperature", "0", *url])
        assert r.exit_code == 0, r.output
        ids.append(r.output.strip())
    r = runner.invoke(app, ["client", "submit", "--text", "x", "--mode", "sing", *url])
    assert r.exit_code == 1 and "--mode 'sing': choose one of continue, infill, alternate" in str(r.exception)
    q = Queue(redis_url, "batch")
    w = GenerateWorker(q, text_ckpt, batch_size=8)
    w.run(max_batches=1, idle_exit=5)
    assert w.last_batch == 4 and w.jobs_done == 4 and w.largest == 4  # one model batch of four
    r = runner.invoke(app, ["client", "fetch", "--out", str(tmp_path), "--wait", "--timeout", "10", *url,
                            *(a for i in ids for a in ("--job", i))])
    assert r.exit_code == 0 and r.output.count(" finished: +20 tokens (added)") == 4, r.output
    r = runner.invoke(app, ["client", "monitor", "--once", *url])
    assert "finished 4, failed 0, dead 0" in r.output
    r = runner.invoke(app, ["client", "fetch", "--out", str(tmp_path / "all"), "--wait", "--timeout", "0", *url])
    assert r.exit_code == 0 and r.output.count(" finished: ") == 4, r.output  # following: the timeout just ends it
    for job_id, text in zip(ids, texts, strict=True):
        tape = w.rm.modality.continuation_tape(w.rm, [np.array(w.rm.tokenizer.encode(text), np.int64)])
        alone = rollout(w.rm, tape, RolloutConfig(length=20, temperature=0.0))[0]
        assert np.array_equal(np.load(tmp_path / job_id / "sample_0.npy"), alone)
        assert (tmp_path / job_id / "sample_0.txt").read_text() == w.rm.tokenizer.decode(alone[1:].tolist())
        assert json.loads((tmp_path / job_id / "result.json").read_text())["status"] == "finished"


def test_batched_jobs_with_different_seeds_sample_what_each_samples_alone(redis_url, text_ckpt):
    """Temperature 1, jobs of different seeds (`client submit --count 3` makes seeds 1337..1339;
    one leaves the seed at its default 0) in one model batch, continued past the context (two
    window rounds): each job's sample is exactly the one `rollout` draws for it alone."""
    from amtrain.rollout.run import RolloutConfig, rollout
    from amtrain.serve.client import submit
    from amtrain.serve.queue import Queue
    from amtrain.serve.worker import GenerateWorker

    q = Queue(redis_url, "seeds")
    opts = {"length": 80, "temperature": 1.0}
    jobs = [(i, "abcd", 1337 + n) for n, i in enumerate(submit(q, opts | {"seed": 1337}, text="abcd", count=3))]
    jobs += [(submit(q, opts | {"seed": 1337}, text="wxyz")[0], "wxyz", 1337), (submit(q, opts, text="Lord")[0], "Lord", 0)]
    w = GenerateWorker(q, text_ckpt, batch_size=8)
    w.run(max_batches=1, idle_exit=5)
    assert w.last_batch == 5 and w.jobs_done == 5 and w.largest == 5  # one model batch of five
    samples = []
    for job_id, text, seed in jobs:
        tape = w.rm.modality.continuation_tape(w.rm, [np.array(w.rm.tokenizer.encode(text), np.int64)])
        alone = rollout(w.rm, tape, RolloutConfig(length=80, temperature=1.0, seed=seed))[0]
        got = np.load(io.BytesIO(q.result(job_id)[1]["sample_0.npy"]))
        assert np.array_equal(got, alone), (text, seed)
        samples.append(got)
    assert len({s.tobytes() for s in samples}) == 5  # different seeds, different samples


def test_auth_and_tls_urls(tmp_path):
    from amtrain.serve.queue import Queue

    proc, port = start_redis(tmp_path / "r", "--requirepass", "s3cret", "--user", "alice", "on", ">apw", "~amtrain:*",
                             "&*", "+@all")
    try:
        with pytest.raises(UserError, match="authentication failed.*put the password"):
            Queue(f"redis://127.0.0.1:{port}/0")
        with pytest.raises(UserError, match="authentication failed") as e:
            Queue(f"redis://:wrong@127.0.0.1:{port}/0")
        assert "wrong" not in str(e.value)
        for url in (f"redis://:s3cret@127.0.0.1:{port}/0", f"redis://alice:apw@127.0.0.1:{port}/0"):
            q = Queue(url)
            job = q.submit({"length": 4}, b"hi", "p.txt")
            assert q.job(job)["status"] == "queued"
    finally:
        stop(proc)
    if shutil.which("openssl") is None:
        return
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key, "-out", cert, "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    tls = free_port()
    proc, _ = start_redis(tmp_path / "t", "--tls-port", str(tls), "--tls-cert-file", str(cert), "--tls-key-file",
                          str(key), "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no")
    try:
        with pytest.raises(UserError, match="not trusted.*ssl_ca_certs"):
            Queue(f"rediss://127.0.0.1:{tls}/0")
        q = Queue(f"rediss://127.0.0.1:{tls}/0?ssl_ca_certs={cert}")
        assert q.job(q.submit({"length": 4}, b"hi", "p.txt"))["status"] == "queued"
    finally:
        stop(proc)


# ------------------------------------------------------------------------- audio and the page
@pytest.fixture(scope="module")
def audio_job(redis_url, tmp_path_factory):
    """One audio job through codec -> generate -> codec (workers in this process)."""
    from amtrain.serve import client
    from amtrain.serve.queue import Queue
    from amtrain.serve.worker import CodecWorker, GenerateWorker

    d = tmp_path_factory.mktemp("serve_audio")
    codec_dir = codec_folder(d / "codec")
    ckpt = decoder_ckpt(d / "dec", "audio", {"num_codebooks": 2, "layout": "delay"}, max_seq_len=64)
    wav = d / "prompt.wav"
    y, sr = sf.read(JOPLIN, dtype="float32", frames=24000)  # 1 s
    sf.write(wav, y, sr)
    q = Queue(redis_url, "audio")
    gen = GenerateWorker(q, ckpt)  # says which checkpoint (codebooks) the queue serves
    codec = CodecWorker(q, codec_dir)
    job = client.submit(q, {"length": 0.5, "seconds": True, "seed": 0}, prompt=wav)[0]
    assert q.job(job)["stage"] == "encode"
    stages = []
    for w in (codec, gen, codec):
        w.run(max_batches=1, idle_exit=5)
        stages.append(q.job(job)["stage"])
    assert stages == ["generate", "decode", "done"]
    return q, job, codec, codec_dir


def test_audio_job_codec_generate_codec_wav(audio_job):
    from amtrain.modalities import RolloutConfig
    from amtrain.modalities.audio import audio_frames

    q, job, worker, _ = audio_job
    codec = worker.codec
    meta, files = q.result(job)
    assert meta["status"] == "finished" and meta["attempts"] == 1
    info = sf.info(io.BytesIO(files["sample_0.wav"]))
    new = audio_frames(RolloutConfig(length=0.5, seconds=True, frame_rate=codec.frame_rate), 0.5)
    assert info.samplerate == codec.sample_rate == 24000
    assert info.frames == (75 + new) * codec.hop_length  # 1 s of prompt + 0.5 s generated
    chunks = meta["analysis"]  # prep-audio's analysis of the prompt, in the same pass
    assert [(c["start_frame"], c["end_frame"]) for c in chunks] == [(0, 75)]
    assert {"flux", "rms_db", "novelty", "stability", "priority"} <= set(chunks[0])


def test_priority_prefix_and_recurring_postfix_infill(audio_job, redis_url, tmp_path):
    """The seed's out-of-distribution prompt: the file's strongest chunk, then (gap, second
    strongest chunk) twice; a FIM decoder in-fills both gaps, nothing else changes."""
    from amtrain.serve import client
    from amtrain.serve.queue import Queue
    from amtrain.serve.worker import CodecWorker, GenerateWorker

    codec_dir = audio_job[3]
    wav = tmp_path / "long.wav"
    y, sr = sf.read(JOPLIN, dtype="float32", frames=24000 * 11)  # chunks of 5, 5 and 1 s
    sf.write(wav, y, sr)
    q = Queue(redis_url, "fim")
    gen = GenerateWorker(q, fim_decoder_ckpt(tmp_path / "fim", "audio", {"num_codebooks": 2, "layout": "delay"},
                                             max_seq_len=128))
    codec = CodecWorker(q, codec_dir)
    job = client.submit(q, {"mode": "infill", "priority_rank": 0, "length": 0.2, "seconds": True, "postfix_repeat": 2,
                            "seed": 0}, prompt=wav)[0]
    for w in (codec, gen, codec):
        w.run(max_batches=1, idle_exit=5)
    meta, files = q.result(job)
    assert meta["status"] == "finished", meta
    chunks = sorted(meta["analysis"], key=lambda c: -c["priority"])
    assert len(chunks) == 3
    pre, post = (c["end_frame"] - c["start_frame"] for c in chunks[:2])
    gap = 15  # 0.2 s at 75 frames/s
    total = pre + 2 * (gap + post)
    assert meta["lines"] == [f"{2 * gap} frames changed in the range, +{2 * gap / 75:.2f} s; {total} frames in all"]
    assert sf.info(io.BytesIO(files["sample_0.wav"])).frames == total * codec.codec.hop_length


def test_results_page_in_headless_chromium(audio_job, redis_url, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("needs Debian's chromium (.ci/run installs it)")
    from PIL import Image

    q, job, _, _ = audio_job
    port = free_port()
    web = subprocess.Popen([sys.executable, "-m", "amtrain", "serve", "web", "--redis", redis_url, "--queue", "audio",
                            "--port", str(port)], env=env(), cwd=REPO, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        def up():
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1).status == 200
            except OSError:
                return False

        wait_for(up, 30, "the results page")
        index = urllib.request.urlopen(f"http://127.0.0.1:{port}/").read().decode()
        assert job in index and "finished" in index
        wav = urllib.request.urlopen(f"http://127.0.0.1:{port}/job/{job}/file/sample_0.wav")
        assert wav.headers["content-type"] == "audio/wav" and wav.read() == q.result(job)[1]["sample_0.wav"]
        shot = tmp_path / "page.png"
        dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'c'}",
                              f"--screenshot={shot}", "--window-size=900,700", "--dump-dom",
                              f"http://127.0.0.1:{port}/job/{job}"], capture_output=True, text=True, timeout=60).stdout
        assert f"<audio controls=\"\" src=\"/job/{job}/file/sample_0.wav\">" in dom
        assert 'id="status">finished<' in dom
        assert shot.read_bytes()[:8] == PNG
        with Image.open(shot) as img:
            assert img.size == (900, 700)
            assert len(img.convert("L").getcolors(256) or []) > 2  # text drawn, not a blank page
    finally:
        stop(web)


def test_results_page_on_a_taken_port_is_one_line(redis_url):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        p = subprocess.run([sys.executable, "-m", "amtrain", "serve", "web", "--redis", redis_url, "--port", str(port)],
                           env=env(), cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines() == [f"error: serve web: cannot listen on 127.0.0.1:{port} (Address already in "
                                             "use); pass another --port, or stop what holds that one"], p.stderr
