"""`amtrain client monitor`: queue depth, in flight, finished / failed / dead, each worker with
its heartbeat age and throughput; a rich live view, or plain lines with `--once`."""

from __future__ import annotations

import time

from amtrain.serve.queue import Queue

STALE_S = 5.0  # a heartbeat older than this: the worker is gone (or stuck)


def lines(st: dict, name: str) -> list[str]:
    out = [f"queue {name}: jobs {st['jobs']}, finished {st.get('finished', 0)}, failed {st.get('failed', 0)}, "
           f"dead {st.get('dead', 0)}"]
    for kind in ("generate", "codec"):
        out.append(f"  {kind}: queued {st[kind]['queued']}, in flight {st[kind]['in_flight']}")
    out.append(f"workers: {len(st['workers'])}")
    for w in st["workers"]:
        state = "stale" if w["age"] > STALE_S else ("stopping" if w.get("stopping") else "alive")
        out.append(f"  {w['name']} {w['kind']} {state} heartbeat {w['age']:.1f}s ago, jobs {w['jobs']}, "
                   f"{w['jobs_per_s']:.2f} jobs/s, took {w['batch']}, model batch {w['rows']} (largest {w['largest']}), "
                   f"in flight {w['in_flight']}")
    return out


def table(st: dict, name: str):
    from rich.console import Group
    from rich.table import Table

    head = Table(title=f"amtrain queue {name}: {st['jobs']} jobs, finished {st.get('finished', 0)}, "
                       f"failed {st.get('failed', 0)}, dead {st.get('dead', 0)}", show_header=True)
    for col in ("stream", "queued", "in flight"):
        head.add_column(col, justify="right" if col != "stream" else "left")
    for kind in ("generate", "codec"):
        head.add_row(kind, str(st[kind]["queued"]), str(st[kind]["in_flight"]))
    workers = Table(title="workers (batch: jobs in the model batch now; max: the most so far)", show_header=True)
    workers.add_column("worker", no_wrap=True)
    for col in ("kind", "state", "beat", "jobs", "jobs/s", "took", "batch", "max", "held"):
        workers.add_column(col, justify="left" if col in ("kind", "state") else "right")
    for w in st["workers"]:
        state = "[red]stale" if w["age"] > STALE_S else ("[yellow]stopping" if w.get("stopping") else "[green]alive")
        workers.add_row(w["name"], w["kind"], state, f"{w['age']:.1f}s", str(w["jobs"]), f"{w['jobs_per_s']:.2f}",
                        str(w["batch"]), str(w["rows"]), str(w["largest"]), str(w["in_flight"]))
    return Group(head, workers)


def monitor(queue: Queue, once: bool = False, interval: float = 1.0) -> None:
    if once:
        print("\n".join(lines(queue.stats(), queue.name)), flush=True)
        return
    from rich.live import Live

    with Live(table(queue.stats(), queue.name), refresh_per_second=4) as live:
        while True:
            time.sleep(interval)
            live.update(table(queue.stats(), queue.name))
