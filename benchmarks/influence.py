"""What one feedback key can do to other users' lists before a training run: issue 23's replays, with the feedback
influence policy off and on, same run.

    python -m benchmarks.influence                      # the tests' kind of model: random CMN, synthetic data
    python -m benchmarks.influence --data ../shared/data/citeulike-a.npz

Two servers (`python -m app`, auth on, a `writer` key with the feedback scope, a `reader` with recommend):
- `policy off`: CMN_MAX_POPULARITY_GAIN and CMN_FEEDBACK_PER_USER_PER_HOUR lifted (as before issue 23);
- `policy on`: their defaults.
On each, the issue's attacks:
- **an item on top of every cold-start list**: 800 events for the least popular item from 800 distinct users (all
  known users, then invented ones, which are created live). Reported: the item's rank in the fallback list an
  unknown user gets, and in the lists of 50 anonymous sessions (10-item histories, folded in), before and after:
  how many have it at #1 and in their top 10;
- **a victim's top 10 replaced**: 10 events naming the victim's top 10; reported: how many of them remain in its
  new top 10, and how many more events for the victim the key may send within the hour (it sends up to 1,000).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import secrets
import tempfile
from pathlib import Path

import httpx
import numpy as np
from tqdm import tqdm

from benchmarks.http_load import make_checkpoint
from tests.harness.servers import running_server

LIFTED = {"max_popularity_gain": 10 ** 9, "feedback_per_user_per_hour": 0}
SESSIONS, SESSION_ITEMS, EVENTS = 50, 10, 800


def attack(checkpoint: str, tmp: Path, policy: dict, seed: int = 0) -> dict:
    keys = {n: "cmn-" + secrets.token_urlsafe(24) for n in ("writer", "reader")}
    (tmp / "keys").write_text(f"{hashlib.sha256(keys['writer'].encode()).hexdigest()} feedback writer\n"
                              f"{hashlib.sha256(keys['reader'].encode()).hexdigest()} recommend reader\n")
    writer, reader = ({"Authorization": f"Bearer {keys[n]}"} for n in ("writer", "reader"))
    rng = np.random.default_rng(seed)
    with running_server(checkpoint, tmp, auth_file=tmp / "keys", log_level="warning", timeout=300,
                        **policy) as (url, _), httpx.Client(base_url=url, timeout=300) as http:
        health = http.get("/health").json()
        ranked = [x["item_id"] for x in http.post("/recommend", json={"user_id": "nobody", "k": 1000},
                                                  headers=reader).json()["items"]]
        everything = [x["item_id"] for x in http.post("/recommend", json={"user_id": "nobody", "k": 1000,
                                                                          "exclude": ranked[:100]},
                                                      headers=reader).json()["items"]]
        catalogue = list(dict.fromkeys(ranked + everything))
        target = catalogue[-1]                                       # the least popular item listed
        sessions = [list(rng.choice(catalogue[:-1], SESSION_ITEMS, replace=False)) for _ in range(SESSIONS)]
        users = [str(u) for u in range(health["users"])]

        def ranks() -> dict:
            fallback = [x["item_id"] for x in http.post("/recommend", json={"user_id": "nobody", "k": 1000},
                                                        headers=reader).json()["items"]]
            lists = [[x["item_id"] for x in r["items"]] for r in http.post(
                "/recommend/batch", json={"requests": [{"history": s, "k": 10} for s in sessions]},
                headers=reader).json()["results"]]
            return {"fallback rank": fallback.index(target) + 1 if target in fallback else ">1000",
                    "sessions with it #1": sum(lst[:1] == [target] for lst in lists),
                    "sessions with it in top 10": sum(target in lst for lst in lists)}
        before = ranks()
        senders = (users + [f"invented-{n}" for n in range(EVENTS)])[:EVENTS]
        stored = sum(http.post("/feedback", json={"events": [{"user_id": u, "item_id": target}
                                                              for u in senders[n:n + 100]]},
                               headers=writer).json().get("stored", 0) for n in range(0, EVENTS, 100))
        after = ranks()

        victim = users[7]
        top = [x["item_id"] for x in http.post("/recommend", json={"user_id": victim, "k": 10},
                                               headers=reader).json()["items"]]
        http.post("/feedback", json={"events": [{"user_id": victim, "item_id": i} for i in top]}, headers=writer)
        now = [x["item_id"] for x in http.post("/recommend", json={"user_id": victim, "k": 10},
                                               headers=reader).json()["items"]]
        more, sent = [i for i in catalogue if i not in top], 0
        for n in range(0, 1000, 10):
            r = http.post("/feedback", json={"events": [{"user_id": victim, "item_id": i} for i in more[n:n + 10]]},
                          headers=writer)
            if r.status_code != 200:
                break
            sent += 10
    return {"events stored": stored, "before": before, "after": after,
            "victim's top 10 left": len(set(top) & set(now)), "more events for the victim this hour": sent}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.influence", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", help="a checkpoint to serve (default: a random CMN on --data)")
    parser.add_argument("--data", default="synthetic")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "cmn-bench-cost"))
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = args.checkpoint or str(make_checkpoint(work / f"{Path(args.data).stem}.ckpt", args.data))
    for name, policy in tqdm([("policy off", LIFTED), ("policy on", {})], desc="servers"):
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            r = attack(checkpoint, Path(tmp), policy)
        left, more = r["victim's top 10 left"], r["more events for the victim this hour"]
        tqdm.write(f"{name}: {EVENTS} events for a little-known item ({r['events stored']} stored): before "
                   f"{r['before']}, after {r['after']}; 10 events for a victim: {left} of its top 10 left, then "
                   f"{more} more events for it accepted within the hour (of 1,000 tried)")


if __name__ == "__main__":
    main()
