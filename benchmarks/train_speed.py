"""Training throughput (BPR triples/s) of our pipeline against the notebook's, on the same batches count, same run.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/train_speed.py                    # citeulike-a, hops 2, batch 128
    python benchmarks/train_speed.py --batches 400 --rounds 3 --json /tmp/train_speed.json

ours      training.train.fit_epoch itself (packed neighbourhoods, CMN.forward, TF1 RMSProp with sparse row updates,
          per-tensor clipping, L2) fed by a TripleSampler epoch cut to --batches batches; the sampler is vectorised
          and runs once per epoch before fit_epoch's clock starts, so its cost per triple (a whole epoch timed
          once, prorated) is added to ours.
notebook  the seed notebook's pipeline (../shared/seeds): Python loops per example that draw the negative by
          rejection and fill neighbourhood arrays padded to the batch's longest, nn.Embedding tables (dense
          gradients), attention by broadcast multiply-and-sum under the finfo mask, torch.optim.RMSprop
          (momentum 0.9) over every parameter, global-norm clipping. Its hop maps are registered here (the
          notebook's were not, so they were never trained): the same model work as ours.
Both run --batches steps of --batch-size triples, alternately for --rounds rounds; best round of each. Target >= 10x.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from model.store.checkpoint import csr
from model.cmn import CMN, CMNConfig
from training import data as data_mod
from training.optim import make_optimizer
from training.sampler import TripleSampler
from training.train import TrainConfig, cmn_pair_scores, fit_epoch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = (ROOT / ".." / "shared" / "data" / "citeulike-a.npz").resolve()


# --------------------------------------------------------------------------- ours

class FirstBatches:
    """A TripleSampler whose epochs stop after `n` triples (fit_epoch runs on whatever epoch() returns)."""

    def __init__(self, sampler: TripleSampler, n: int):
        self.sampler, self.n = sampler, n
        self._cache: dict[int, tuple] = {}

    def epoch(self, epoch: int):
        if epoch not in self._cache:
            self._cache[epoch] = tuple(a[:self.n] for a in self.sampler.epoch(epoch))
        return self._cache[epoch]

    def __len__(self) -> int:
        return self.n


# --------------------------------------------------------------------------- the notebook's pipeline

class NotebookData:
    """The notebook's Dataset: sets and dicts, per-example negative sampling, padded batches."""

    def __init__(self, train: np.ndarray, n_users: int, n_items: int, seed: int = 0):
        self.train_data = train
        self._n_items = n_items
        self.user_items: dict[int, set] = {}
        self.item_users: dict[int, set] = {}
        for u, i in train.tolist():
            self.user_items.setdefault(u, set()).add(i)
            self.item_users.setdefault(i, set()).add(u)
        self.item_users_list = {k: list(v) for k, v in self.item_users.items()}
        self.max_neighbors = max(len(x) for x in self.item_users.values())
        self._train_index = np.arange(len(train))
        np.random.seed(seed)

    def _sample_negative_item(self, user_id: int) -> int:
        n = np.random.randint(0, self._n_items)
        positive_items = self.user_items[user_id]
        while n in positive_items or n not in self.item_users:
            n = np.random.randint(0, self._n_items)
        return n

    def get_data(self, batch_size: int, neg_count: int):
        batch = np.zeros((batch_size, 3), dtype=np.uint32)
        pos_neighbor = np.zeros((batch_size, self.max_neighbors), dtype=np.int32)
        pos_length = np.zeros(batch_size, dtype=np.int32)
        neg_neighbor = np.zeros((batch_size, self.max_neighbors), dtype=np.int32)
        neg_length = np.zeros(batch_size, dtype=np.int32)
        np.random.shuffle(self._train_index)
        idx = 0
        for user_idx, item_idx in self.train_data[self._train_index]:
            for _ in range(neg_count):
                neg_item_idx = self._sample_negative_item(user_idx)
                batch[idx, :] = [user_idx, item_idx, neg_item_idx]
                if len(self.item_users.get(item_idx, [])) > 0:
                    pos_length[idx] = len(self.item_users[item_idx])
                    pos_neighbor[idx, :pos_length[idx]] = self.item_users_list[item_idx]
                else:
                    pos_length[idx] = 1
                    pos_neighbor[idx, 0] = item_idx
                if len(self.item_users.get(neg_item_idx, [])) > 0:
                    neg_length[idx] = len(self.item_users[neg_item_idx])
                    neg_neighbor[idx, :neg_length[idx]] = self.item_users_list[neg_item_idx]
                else:
                    neg_length[idx] = 1
                    neg_neighbor[idx, 0] = neg_item_idx
                idx += 1
                if idx == batch_size:
                    max_length = max(neg_length.max(), pos_length.max())
                    yield batch, pos_neighbor[:, :max_length], pos_length, neg_neighbor[:, :max_length], neg_length
                    pos_length[:] = 1
                    neg_length[:] = 1
                    idx = 0


class NotebookMemory(nn.Module):
    def __init__(self, hops: int, d: int):
        super().__init__()
        self.hops = hops
        self.hop_mapping = nn.ModuleList(nn.Linear(d, d) for _ in range(hops - 1))  # registered (see docstring)
        for m in self.hop_mapping:
            nn.init.kaiming_normal_(m.weight)
            m.bias.data.fill_(1.0)

    @staticmethod
    def mask_mod(inputs, mask_length, maxlen):
        memory_mask = (torch.arange(maxlen).expand(len(mask_length), maxlen) < mask_length.unsqueeze(1)).float()
        finfo = np.finfo(np.float32)
        lower_bound = finfo.max * memory_mask + finfo.min * (memory_mask < 1).float()
        slice_length = torch.max(mask_length)
        return torch.min(inputs[:, :slice_length], lower_bound[:, :slice_length])

    def attend(self, memory, output_memory, query, memory_mask, maxlen):
        scores = (query.unsqueeze(-1).transpose(2, 1) * memory).sum(2)
        attention = F.softmax(self.mask_mod(scores, memory_mask, maxlen), dim=-1)
        return (output_memory.transpose(2, 1) * attention.unsqueeze(1)).sum(2)

    def forward(self, query, memory, output_memory, seq_length, maxlen):
        cur_max = torch.max(seq_length).item()
        memory, output_memory = memory[:, :cur_max], output_memory[:, :cur_max]
        user_query, item_query = query
        z = user_query + item_query
        o = None
        for hop in range(self.hops):
            if hop:
                z = F.relu(self.hop_mapping[hop - 1](z) + o)
            o = self.attend(memory, output_memory, z, seq_length, maxlen)
        return o


class NotebookCMN(nn.Module):
    def __init__(self, n_users: int, n_items: int, d: int, hops: int, maxlen: int):
        super().__init__()
        self.maxlen = maxlen
        self.user_memory = nn.Embedding(n_users, d)
        self.item_memory = nn.Embedding(n_items, d)
        self.user_output = nn.Embedding(n_users, d)
        self.mem_layer = NotebookMemory(hops, d)
        self.dense = nn.Linear(2 * d, d)
        self.out = nn.Linear(d, 1, bias=False)

    def score(self, cur_user, items, neighborhoods, lengths):
        cur_item = self.item_memory(items)
        o = self.mem_layer((cur_user, cur_item), self.user_memory(neighborhoods), self.user_output(neighborhoods),
                           lengths, self.maxlen)
        return self.out(F.relu(self.dense(torch.cat((cur_user * cur_item, o), 1)))).squeeze()

    def forward(self, users, items, neg_items, nbr, nbr_len, neg_nbr, neg_nbr_len):
        cur_user = self.user_memory(users)
        return self.score(cur_user, items, nbr, nbr_len), self.score(cur_user, neg_items, neg_nbr, neg_nbr_len)


def notebook_steps(data: NotebookData, model: NotebookCMN, optimizer, n_batches: int, batch_size: int,
                   neg: int) -> float:
    """Seconds for n_batches training steps, batch construction included."""
    start = time.perf_counter()
    for k, batch in enumerate(data.get_data(batch_size, neg)):
        if k == n_batches:
            break
        ratings, pos_nbr, pos_len, neg_nbr, neg_len = batch
        tensors = [torch.LongTensor(np.array(a, dtype=np.int32)) for a in
                   (ratings[:, 0], ratings[:, 1], ratings[:, 2], pos_nbr, pos_len, neg_nbr, neg_len)]
        optimizer.zero_grad()
        pos, negative = model(*tensors)
        loss = torch.mean(-torch.log(torch.sigmoid(pos - negative) + 1e-12))
        for name, param in model.named_parameters():  # the notebook's L2 (names that match nothing here either)
            if name in ("mem_layer.hop_mapping.weight", "output_module.dense.weight", "output_module.out.weight"):
                loss = loss + 0.1 * torch.sqrt(param.pow(2).sum())
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
    return time.perf_counter() - start


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--batches", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--hops", type=int, default=2)
    ap.add_argument("--neg", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ds = data_mod.load(args.data)
    n_triples = args.batches * args.batch_size
    print(f"{ds.summary()}\n{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, load average {os.getloadavg()}; "
          f"{args.batches} batches of {args.batch_size}, hops {args.hops}, {args.neg} negatives")

    torch.manual_seed(0)
    model = CMN(CMNConfig(ds.n_users, ds.n_items, 50, args.hops))
    optimizer = make_optimizer("rmsprop", model.parameters(), 1e-3)
    sampler = TripleSampler(ds.train, ds.n_items, args.neg, seed=0)
    start = time.perf_counter()
    sampler.epoch(0)
    sampling_per_triple = (time.perf_counter() - start) / len(sampler)
    indptr, indices = (torch.from_numpy(a) for a in csr(ds.train[:, 1], ds.train[:, 0], ds.n_items))
    cfg = TrainConfig(batch_size=args.batch_size, neg=args.neg, hops=args.hops, progress=False)
    pair_scores = cmn_pair_scores(model, indptr, indices, exclude_self=False)
    few = FirstBatches(sampler, n_triples)

    notebook_data = NotebookData(ds.train, ds.n_users, ds.n_items)
    notebook_model = NotebookCMN(ds.n_users, ds.n_items, 50, args.hops, notebook_data.max_neighbors)
    notebook_opt = torch.optim.RMSprop(notebook_model.parameters(), lr=1e-3, momentum=0.9)

    fit_epoch(model, pair_scores, optimizer, FirstBatches(sampler, 20 * args.batch_size), 99, cfg,
              torch.device("cpu"), "warm-up")
    notebook_steps(notebook_data, notebook_model, notebook_opt, 5, args.batch_size, args.neg)
    ours, notebook, ours_cpu, notebook_cpu = [], [], [], []
    for r in range(args.rounds):
        cpu = time.process_time()
        stats = fit_epoch(model, pair_scores, optimizer, few, r, cfg, torch.device("cpu"), "ours")
        ours_cpu.append(time.process_time() - cpu + sampling_per_triple * n_triples)
        ours.append(stats["seconds"] + sampling_per_triple * n_triples)
        cpu = time.process_time()
        notebook.append(notebook_steps(notebook_data, notebook_model, notebook_opt, args.batches, args.batch_size,
                                       args.neg))
        notebook_cpu.append(time.process_time() - cpu)
        print(f"  round {r + 1}: ours {n_triples / ours[-1]:,.0f} triples/s "
              f"(fit_epoch {stats['seconds']:.2f} s + sampling {sampling_per_triple * n_triples:.3f} s; "
              f"CPU {ours_cpu[-1]:.2f} s), notebook {n_triples / notebook[-1]:,.0f} triples/s ({notebook[-1]:.2f} s; "
              f"CPU {notebook_cpu[-1]:.2f} s)", flush=True)
    ours_rate, notebook_rate = n_triples / min(ours), n_triples / min(notebook)
    ratio, cpu_ratio = ours_rate / notebook_rate, min(notebook_cpu) / min(ours_cpu)
    print(f"\nwall: ours {ours_rate:,.0f} triples/s, notebook pipeline {notebook_rate:,.0f} triples/s: {ratio:.1f}x "
          f"(target >= 10x -> {'met' if ratio >= 10 else 'MISSED'}); an epoch ({len(sampler):,} triples) at this "
          f"rate: ours {len(sampler) / ours_rate:.0f} s, notebook {len(sampler) / notebook_rate:.0f} s")
    print(f"CPU time (all threads; what the work costs whatever else runs): ours {n_triples / min(ours_cpu):,.0f}, "
          f"notebook {n_triples / min(notebook_cpu):,.0f} triples per CPU-second: {cpu_ratio:.1f}x; "
          f"load average at the end {os.getloadavg()}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "ours_triples_per_s": ours_rate, "notebook_triples_per_s": notebook_rate,
            "ratio": ratio, "cpu_ratio": cpu_ratio, "ours_seconds": ours, "notebook_seconds": notebook,
            "ours_cpu_seconds": ours_cpu, "notebook_cpu_seconds": notebook_cpu,
            "sampling_seconds_per_triple": sampling_per_triple, "batches": args.batches,
            "batch_size": args.batch_size, "hops": args.hops, "threads": torch.get_num_threads(),
            "command": " ".join([sys.executable] + sys.argv)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
