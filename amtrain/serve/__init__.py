"""Inference services over Redis: generation and codec workers, a client, a results page.

    queue.py    the Redis layout: streams + consumer groups, job hashes, results written once
    jobs.py     what a job may ask for (RolloutConfig options) and the limits a worker enforces
    worker.py   the worker loop (claim, batch, heartbeat, retry, dead letter, SIGTERM) and the
                generate / codec workers, which run `amtrain.rollout` and `amtrain.codec` /
                prep-audio's analysis
    client.py   submit and fetch; monitor.py the live view; web.py the results page
"""
