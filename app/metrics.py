"""Prometheus metrics, served as text at GET /metrics."""
from prometheus_client import Counter, Gauge, Histogram, Info

LATENCY = Histogram("cmn_request_seconds", "HTTP request latency", ["route", "method", "status"],
                    buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
SCORED_ITEMS = Counter("cmn_scored_items_total", "items scored by CMN", ["strategy"])
RECOMMENDATIONS = Counter("cmn_recommendations_total", "recommendation lists served", ["kind", "strategy"])
FALLBACKS = Counter("cmn_fallbacks_total", "non-personalised lists served", ["reason"])
BATCH_SIZE = Histogram("cmn_batch_size", "requests scored per model call",
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
QUEUE_WAIT = Histogram("cmn_queue_wait_seconds", "time a request waited for the model thread",
                       buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1))
QUEUE_DEPTH = Gauge("cmn_queue_depth", "requests waiting for the model thread")
QUEUE_PAIRS = Gauge("cmn_queue_pairs", "(user, item) pairs waiting to be scored: what CMN_MAX_QUEUE_PAIRS bounds")
FEEDBACK = Counter("cmn_feedback_events_total", "feedback events received", ["outcome"])
RELOADS = Counter("cmn_reloads_total", "model reloads", ["outcome"])
MODEL = Info("cmn_model", "the model being served")
