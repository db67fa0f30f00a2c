"""The Celery peer of the job benchmarks (bench/jobs.py): the same work as
fastlane's built-in `noop` and `sleep` job types, on a Redis broker.

Each task counts itself in Redis, so that the runner can tell when all are
done without a result backend (which would add a write per task).

    celery -A celery_app worker --concurrency 2 --loglevel warning
"""

import os
import time

import redis
from celery import Celery

BROKER = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/15")
DONE_KEY = os.environ.get("BENCH_DONE_KEY", "fastlane-bench:done")
STARTED_KEY = os.environ.get("BENCH_STARTED_KEY", "fastlane-bench:started")

app = Celery("celery_app", broker=BROKER)
app.conf.update(
    task_ignore_result=True,
    worker_prefetch_multiplier=int(os.environ.get("BENCH_PREFETCH", "64")),
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)
counter = redis.Redis.from_url(BROKER)


@app.task(name="noop")
def noop():
    counter.incr(DONE_KEY)


@app.task(name="sleep")
def sleep(ms):
    counter.incr(STARTED_KEY)
    time.sleep(ms / 1000)
    counter.incr(DONE_KEY)
