"""`amtrain serve web`: a results page on Starlette (served by uvicorn).

    /                      the newest jobs: id, status, stage, submitted, worker, first line
    /job/<id>              one job: options, status or error, each text file, an <audio> player
                           for each .wav, the piano roll .png of a MIDI result, the audio
                           analysis (chunk priorities) when the prompt went through the codec
    /job/<id>/file/<name>  a result file as it was written (download)
    /api/stats             the monitor's figures as JSON
"""

from __future__ import annotations

import html
import json
import mimetypes
import time

from amtrain.serve.queue import Queue

STYLE = """body{font-family:sans-serif;margin:1.5em;max-width:70em}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}pre{background:#f4f4f4;padding:.6em;
white-space:pre-wrap}.finished{color:#070}.failed,.dead{color:#b00}.running{color:#06c}img{max-width:100%}"""


def _page(title: str, body: str, refresh: int = 0) -> str:
    meta = f"<meta http-equiv='refresh' content='{refresh}'>" if refresh else ""
    return (f"<!doctype html><html><head><meta charset='utf-8'>{meta}<title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>{body}</body></html>")


def _when(t: str | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(float(t))) if t else ""


def make_app(queue: Queue):
    from starlette.applications import Starlette
    from starlette.responses import HTMLResponse, JSONResponse, Response
    from starlette.routing import Route

    async def index(request):
        rows = []
        for job_id in queue.job_ids(200):
            job = queue.job(job_id)
            meta = queue.meta(job_id)
            first = ""
            if meta is not None:
                first = (meta.get("lines") or [meta.get("error", "")])[0]
            status = html.escape(job.get("status", "?"))
            rows.append(f"<tr><td><a href='/job/{job_id}'>{job_id}</a></td><td class='{status}'>{status}</td>"
                        f"<td>{html.escape(job.get('stage', ''))}</td><td>{_when(job.get('submitted'))}</td>"
                        f"<td>{html.escape(job.get('worker', ''))}</td><td>{html.escape(first)}</td></tr>")
        st = queue.stats()
        head = (f"<p>queue <b>{html.escape(queue.name)}</b>: {st['generate']['queued'] + st['codec']['queued']} waiting, "
                f"{st['generate']['in_flight'] + st['codec']['in_flight']} in flight, {st.get('finished', 0)} finished, "
                f"{st.get('failed', 0)} failed, {st.get('dead', 0)} dead; {len(st['workers'])} workers</p>")
        table = ("<table><tr><th>job</th><th>status</th><th>stage</th><th>submitted</th><th>worker</th>"
                 "<th>result</th></tr>" + "".join(rows) + "</table>")
        return HTMLResponse(_page("amtrain jobs", f"<h1>amtrain jobs</h1>{head}{table}", refresh=5))

    async def job_page(request):
        job_id = request.path_params["job_id"]
        job = queue.job(job_id)
        if not job:
            return HTMLResponse(_page("no such job", f"<p>no job {html.escape(job_id)}</p>"), status_code=404)
        status = html.escape(job.get("status", "?"))
        parts = [f"<h1>job {html.escape(job_id)}</h1><p><a href='/'>all jobs</a></p>",
                 f"<p>status <b class='{status}' id='status'>{status}</b>, stage {html.escape(job.get('stage', ''))}, "
                 f"attempts {html.escape(job.get('attempts', ''))}, worker {html.escape(job.get('worker', ''))}</p>",
                 f"<pre>{html.escape(json.dumps(json.loads(job.get('options') or '{}'), indent=1))}</pre>"]
        res = queue.result(job_id)
        if res is not None:
            meta, files = res
            if meta.get("error"):
                parts.append(f"<p class='failed'>error: {html.escape(meta['error'])}</p>")
            for line in meta.get("lines", []):
                parts.append(f"<p>{html.escape(line)}</p>")
            for name in sorted(files):
                url = f"/job/{job_id}/file/{html.escape(name)}"
                link = f"<p><a href='{url}'>{html.escape(name)}</a> ({len(files[name])} bytes)</p>"
                if name.endswith(".wav"):
                    parts.append(f"{link}<audio controls src='{url}'></audio>")
                elif name.endswith(".png"):
                    parts.append(f"{link}<img src='{url}' alt='{html.escape(name)}'>")
                elif name.endswith(".txt"):
                    parts.append(f"{link}<pre>{html.escape(files[name].decode(errors='replace')[:20000])}</pre>")
                else:
                    parts.append(link)
            if meta.get("analysis"):
                rows = "".join(f"<tr><td>{c['start_frame']}-{c['end_frame']}</td><td>{c['priority']:.3f}</td>"
                               f"<td>{c['rms_db']:.1f}</td><td>{c['novelty']:.3f}</td></tr>" for c in meta["analysis"])
                parts.append("<h2>prompt analysis</h2><table><tr><th>frames</th><th>priority</th><th>rms dB</th>"
                             f"<th>novelty</th></tr>{rows}</table>")
        return HTMLResponse(_page(f"job {job_id}", "".join(parts)))

    async def file(request):
        job_id, name = request.path_params["job_id"], request.path_params["name"]
        res = queue.result(job_id)
        if res is None or name not in res[1]:
            return Response("no such file", status_code=404)
        kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
        if name.endswith(".wav"):
            kind = "audio/wav"
        return Response(res[1][name], media_type=kind)

    async def stats(request):
        return JSONResponse(queue.stats())

    return Starlette(routes=[Route("/", index), Route("/job/{job_id}", job_page),
                             Route("/job/{job_id}/file/{name}", file), Route("/api/stats", stats)])


def serve(queue: Queue, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Bind first (a taken port is one line, before anything says the page is up), then hand the
    socket to uvicorn."""
    import socket
    import sys

    import uvicorn

    from amtrain.errors import UserError

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"serve web: cannot listen on {host}:{port} ({e.strerror}); pass another --port, "
                        "or stop what holds that one") from None
    print(f"serve web: http://{host}:{sock.getsockname()[1]}/ (queue {queue.name})", file=sys.stderr, flush=True)
    uvicorn.Server(uvicorn.Config(make_app(queue), log_level="warning")).run(sockets=[sock])
