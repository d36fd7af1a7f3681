"""Prometheus metrics, served as text at GET /metrics.

With several worker processes (CMN_WORKERS > 1) `python -m app` sets PROMETHEUS_MULTIPROC_DIR: every worker
writes its metrics there and a scrape, whichever worker answers it, reports all of them (prometheus_client's
multiprocess mode: counters and histograms summed, gauges combined as each one's `multiprocess_mode` says).
"""
import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

LATENCY = Histogram("cmn_request_seconds", "HTTP request latency", ["route", "method", "status"],
                    buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
SCORED_ITEMS = Counter("cmn_scored_items_total", "items scored by CMN", ["strategy"])
RECOMMENDATIONS = Counter("cmn_recommendations_total", "recommendation lists served", ["kind", "strategy"])
FALLBACKS = Counter("cmn_fallbacks_total", "non-personalised lists served", ["reason"])
BATCH_SIZE = Histogram("cmn_batch_size", "requests scored per model call",
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
QUEUE_WAIT = Histogram("cmn_queue_wait_seconds", "time a request waited for the model thread",
                       buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1))
QUEUE_DEPTH = Gauge("cmn_queue_depth", "requests waiting for the model thread", multiprocess_mode="livesum")
QUEUE_PAIRS = Gauge("cmn_queue_pairs", "(user, item) pairs waiting to be scored: what CMN_MAX_QUEUE_PAIRS bounds",
                    multiprocess_mode="livesum")
FEEDBACK = Counter("cmn_feedback_events_total", "feedback events received", ["outcome"])
FEEDBACK_APPLIED = Counter("cmn_feedback_applied_total", "stored events (from any process) this process applied",
                           ["outcome"])
APPLIED_SEQ = Gauge("cmn_feedback_applied_seq", "sequence number of the last stored event applied (the worker "
                    "furthest behind)", multiprocess_mode="livemin")
LAG = Gauge("cmn_feedback_lag_seconds", "time since the feedback store was last read to its end (the worker "
            "furthest behind)", multiprocess_mode="livemax")
APPLY_LAG = Histogram("cmn_feedback_apply_lag_seconds", "from an event's durable write (on any process) to its "
                      "application here", buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
STORE_UP = Gauge("cmn_feedback_store_up", "1 while the feedback store can be read and written, 0 while it cannot "
                 "(the worker in the worst state)", multiprocess_mode="livemin")
IMPRESSIONS = Counter("cmn_impressions_total", "lists recorded as impressions (sampled by "
                      "CMN_IMPRESSION_SAMPLE)", ["strategy", "model_version", "arm"])
IMPRESSIONS_DROPPED = Counter("cmn_impressions_dropped_total", "impressions dropped unwritten: the buffer was full "
                              "while the store could not be written")
ONLINE_CLICKS = Counter("cmn_online_clicks_total", "feedback events joined to the impression they name, by the "
                        "impression's strategy, model version and arm", ["strategy", "model_version", "arm"])
FEEDBACK_IMPRESSIONS = Counter("cmn_feedback_impressions_total", "feedback events naming an impression: joined, or "
                               "unjoined (not recorded or not written yet, pruned, another user's or item)",
                               ["outcome"])
RELOADS = Counter("cmn_reloads_total", "model reloads", ["outcome"])
LIVE_USERS = Gauge("cmn_live_users", "users created from feedback since the model was trained (fold-in)",
                   multiprocess_mode="livemax")
LIVE_ITEMS = Gauge("cmn_live_items", "items created from feedback since the model was trained (fold-in)",
                   multiprocess_mode="livemax")
MODEL = Gauge("cmn_model_info", "the model being served: 1 for the version served now",
              ["model_version", "device"], multiprocess_mode="liveall")


_served: list[tuple[str, str]] = []


def serving(version: str, device: str) -> None:
    """Label the served model; a replaced one reads 0 (multiprocess files keep every label set ever written)."""
    while _served:
        old = _served.pop()
        MODEL.labels(*old).set(0)
        MODEL.remove(*old)
    MODEL.labels(version, device).set(1)
    _served.append((version, device))


def render() -> bytes:
    if not MULTIPROCESS:
        return generate_latest()
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return generate_latest(registry)


def process_exited() -> None:
    """Drop this worker's live gauges from the shared directory (its counters keep counting in the totals)."""
    if MULTIPROCESS:
        multiprocess.mark_process_dead(os.getpid())
