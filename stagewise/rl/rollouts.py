"""The rl stage's batch source: rollouts of the current policy, then optimizer steps over them.

One rollout: the next prompts_per_rollout prompts of the task (a seeded permutation per pass over
the train problems), group_size completions of each from the batched engine (generate/engine.py)
with the policy as it is now, rewards from the task's verifier, advantages per group
(rl/advantages.py), and, where needed, the old policy's and the reference's per-token log-probs.
Then epochs_per_rollout passes over the rollout, each in mini_batches optimizer steps (a step's
sequences in train.grad_accum micro-batches; the first pass in rollout order, later passes in a
seeded permutation). The next step after the last one starts the next rollout.

Old-policy log-probs are computed only when a rollout feeds more than one optimizer step; with one
step the policy has not moved and the objective uses its own detached log-probs (ratio 1).

Dynamic sampling (DAPO, Yu et al. 2025): a group whose rewards all agree has advantage 0 and
teaches nothing. drop removes such groups from the rollout (all of them kept if every group
agrees); resample samples further prompts, up to resample_rounds more times, until
prompts_per_rollout informative groups are found (topped up with agreeing ones if not).
rl/dropped_groups counts the groups set aside.

Hybrid post-training (HPT, Lv et al. 2025; rl.hybrid: hpt): a prompt whose rollouts succeed at a
rate of at most hpt_threshold is trained instead on the task's reference solution (SFT through
the same estimator; the demonstration stands in for each of the prompt's G completions, so the
prompt weighs what it would have under RL); the others by RL.

Exact resume: each rollout's sampling generator is seeded from (seed, rollout index), so a run
killed while generating regenerates the same rollout from the same weights; a checkpoint taken
between the steps of one rollout keeps the rollout itself (token ids, advantages, log-probs) in
the source's state, since the policy that sampled it is gone.
"""

from __future__ import annotations

import base64
import hashlib
import os
import signal
import time
from dataclasses import dataclass

import numpy as np
import torch

from stagewise.data.batch import IGNORE_INDEX, Batch
from stagewise.generate.engine import generate_batch
from stagewise.rl.advantages import advantages
from stagewise.rl.objective import kl_estimate

# Test hook: SIGKILL the process in the middle of this rollout (1-based), after its sampling.
KILL_IN_ROLLOUT_ENV = "STAGEWISE_DEBUG_KILL_IN_ROLLOUT"


@dataclass
class Sequence:
    ids: np.ndarray          # prompt + completion (+ stop token), int64
    start: int               # index of the first trained token in ids
    advantage: float
    demo: bool = False

    @property
    def trained(self) -> int:
        return len(self.ids) - self.start


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "big") % 2**63


def _pack(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode("ascii")


def _unpack(s: str, dtype) -> np.ndarray:
    return np.frombuffer(base64.b64decode(s), dtype=dtype).copy()


class RolloutSource:
    def __init__(self, task, problems: list, tokenizer, template, rl, seed: int, grad_accum: int, objective,
                 stage: int = 0, reference=None):
        self.task, self.problems, self.tok, self.template, self.rl = task, problems, tokenizer, template, rl
        self.seed, self.accum, self.objective, self.stage = seed, grad_accum, objective, stage
        self.reference = reference        # (policy, batch) -> per-token reference log-probs, or None
        self.stop = tuple(template.stop_ids(tokenizer))
        self.pad = tokenizer.eos_id
        self.trainee = None
        self.steps_per_rollout = rl.epochs_per_rollout * rl.mini_batches
        self.rollout, self.k, self.micro, self.epoch, self.cursor = 0, self.steps_per_rollout, 0, 0, 0
        self.seqs: list[Sequence] = []
        self.old: list[np.ndarray] | None = None
        self.ref: list[np.ndarray] | None = None
        self._metrics: dict = {}
        self._cycle: tuple[float, float] | None = None  # (start time, generation seconds) of the last rollout

    def bind(self, trainee) -> None:
        """The trainee whose model generates (read at every rollout: a precision switch replaces it)."""
        self.trainee = trainee

    # -- the BatchSource protocol ------------------------------------------------------------

    def next(self) -> Batch:
        if self.k >= self.steps_per_rollout:
            self._new_rollout()
        batch = self._micro_batch(self.k, self.micro)
        self.micro += 1
        if self.micro == self.accum:
            self.micro, self.k = 0, self.k + 1
        return batch

    def state_dict(self) -> dict:
        state = {"kind": "rl", "rollout": self.rollout, "k": self.k, "micro": self.micro, "epoch": self.epoch,
                 "cursor": self.cursor, "stage": self.stage}
        if self.k < self.steps_per_rollout:  # mid-rollout: the rollout itself
            state["buffer"] = self._encode()
        return state

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "rl" or state.get("stage") != self.stage:
            return  # the previous stage's source (a stage boundary): this stage starts its own rollouts
        self.rollout, self.k, self.micro = state["rollout"], state["k"], state["micro"]
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        if "buffer" in state:
            self._decode(state["buffer"])

    def metrics(self) -> dict:
        out, self._metrics = self._metrics, {}
        return out

    # -- rollouts ----------------------------------------------------------------------------

    def _next_problems(self, n: int) -> list:
        out = []
        while len(out) < n:
            order = np.random.default_rng(_seed(self.seed, "rl-order", self.epoch)).permutation(len(self.problems))
            take = order[self.cursor:self.cursor + n - len(out)]
            out += [self.problems[i] for i in take]
            self.cursor += len(take)
            if self.cursor == len(self.problems):
                self.epoch, self.cursor = self.epoch + 1, 0
        return out

    def _prompt_ids(self, problem) -> list[int]:
        ids = self.template.prompt_ids(self.tok, [{"role": "user", "content": problem.prompt}])
        model = self.trainee.model
        return ids[-max(1, model.cfg.max_seq_len - self.rl.max_new_tokens):]

    def _sample(self, problems: list, gen: torch.Generator) -> tuple[list, dict]:
        """Per problem: (prompt ids, [completion ids incl. stop], [reward], [correct]); and timing."""
        rl, G = self.rl, self.rl.group_size
        prompts = [self._prompt_ids(p) for p in problems]
        out = generate_batch(self.trainee.model, [p for p in prompts for _ in range(G)], rl.max_new_tokens,
                             temperature=rl.temperature, top_k=rl.top_k, top_p=rl.top_p, stop_ids=self.stop,
                             generator=gen, entropy=True, sync_every=rl.sync_every, compile=rl.compile_decode)
        groups = []
        for i, (prob, prompt) in enumerate(zip(problems, prompts)):
            comps, rewards, correct = [], [], []
            for j in range(i * G, (i + 1) * G):
                text = self.tok.decode(out.tokens[j])
                comps.append(out.tokens[j] + ([out.stop_token[j]] if out.stop_token[j] is not None else []))
                rewards.append(float(self.task.reward(prob, text)))
                correct.append(bool(self.task.correct(prob, text)))
            groups.append((prob, prompt, comps, rewards, correct))
        return groups, {"seconds": out.seconds, "tokens": out.new_tokens, "entropy": out.entropy}

    def _new_rollout(self) -> None:
        rl = self.rl
        t_start = time.perf_counter()
        trainee = self.trainee
        model, precision = trainee.model, trainee.precision
        was_training = model.training
        model.eval()
        gen = torch.Generator(device=model.tok_embeddings.weight.device).manual_seed(_seed(self.seed, "rollout",
                                                                                          self.rollout))
        with torch.no_grad(), precision.inference():
            groups, timing = self._sample(self._next_problems(rl.prompts_per_rollout), gen)
            if self.rollout + 1 == int(os.environ.get(KILL_IN_ROLLOUT_ENV, "-1")):
                os.kill(os.getpid(), signal.SIGKILL)
            kept, dropped = self._dynamic_sampling(groups, gen, timing)
            baseline = self._greedy_baseline(kept) if rl.algorithm == "remax" else None
            self._build(kept, baseline)
            self._logps(model)
        model.train(was_training)
        self.rollout += 1
        self.k, self.micro = 0, 0
        # The policy's own numbers: the first round's groups, before dynamic sampling chose among them.
        rewards = np.array([r for g in groups for r in g[3]], dtype=np.float64)
        correct = np.array([c for g in groups for c in g[4]], dtype=np.float64)
        lengths = [len(c) for g in groups for c in g[2]]
        now = time.perf_counter()
        m = {"reward/mean": float(rewards.mean()), "reward/std": float(rewards.std()),
             "rl/success_rate": float(correct.mean()), "rl/response_len": float(np.mean(lengths)),
             "rl/zero_adv_groups": float(np.mean([len(set(g[3])) == 1 for g in groups])),
             "rl/dropped_groups": dropped, "rl/entropy": timing["entropy"],
             "rollout/seconds": timing["seconds"], "rollout/overhead_s": now - t_start - timing["seconds"],
             "rollout/tokens_per_s": timing["tokens"] / max(timing["seconds"], 1e-9)}
        if rl.hybrid == "hpt":
            m["rl/demo_prompts"] = sum(self._is_demo(g) for g in kept) / len(kept)
        if self._cycle is not None:  # the previous rollout's cycle: generation's share of its wall time
            m["rollout/gen_share"] = self._cycle[1] / max(t_start - self._cycle[0], 1e-9)
        self._cycle = (t_start, timing["seconds"])
        self._metrics = m

    def _dynamic_sampling(self, groups: list, gen, timing: dict) -> tuple[list, int]:
        """(the groups to train on, how many agreeing groups were set aside)."""
        rl, P = self.rl, self.rl.prompts_per_rollout
        if rl.dynamic_sampling == "off":
            return groups, 0
        useful = lambda g: len(set(g[3])) > 1 or self._is_demo(g)  # noqa: E731
        informative = [g for g in groups if useful(g)]
        agreeing = [g for g in groups if not useful(g)]
        least = -(-rl.mini_batches * self.accum // rl.group_size)  # groups that fill every micro-batch
        if rl.dynamic_sampling == "drop":
            fill = agreeing[:max(0, least - len(informative))]
            return informative + fill, len(agreeing) - len(fill)
        for _ in range(rl.resample_rounds):
            need = P - len(informative)
            if need <= 0:
                break
            more, t = self._sample(self._next_problems(need), gen)
            timing["seconds"] += t["seconds"]
            timing["tokens"] += t["tokens"]
            informative += [g for g in more if useful(g)]
            agreeing += [g for g in more if not useful(g)]
        fill = agreeing[:max(0, P - len(informative))]
        return informative[:P] + fill, len(agreeing) - len(fill)

    def _is_demo(self, group) -> bool:
        return self.rl.hybrid == "hpt" and float(np.mean(group[4])) <= self.rl.hpt_threshold

    def _greedy_baseline(self, groups: list) -> torch.Tensor:
        out = generate_batch(self.trainee.model, [g[1] for g in groups], self.rl.max_new_tokens, stop_ids=self.stop,
                             sync_every=self.rl.sync_every)
        return torch.tensor([float(self.task.reward(g[0], self.tok.decode(t))) for g, t in zip(groups, out.tokens)])

    def _build(self, groups: list, baseline) -> None:
        rl, G = self.rl, self.rl.group_size
        rl_groups = [g for g in groups if not self._is_demo(g)]
        rewards = torch.tensor([r for g in rl_groups for r in g[3]], dtype=torch.float32)
        self._rl_rewards = rewards
        self.seqs = []
        adv = iter(())
        if rl_groups:
            if baseline is not None:
                baseline = torch.stack([b for g, b in zip(groups, baseline) if not self._is_demo(g)])
            adv = iter(advantages(rewards, G, rl.algorithm, rl.scale_rewards, baseline).tolist())
        for g in groups:
            prob, prompt, comps = g[:3]
            if self._is_demo(g):  # its demonstration stands in for each of its G completions
                self.seqs += [self._demo(prob) for _ in comps]
                continue
            for c in comps:
                self.seqs.append(Sequence(np.array(prompt + c, dtype=np.int64), len(prompt), next(adv)))
        self.T = max(len(s.ids) for s in self.seqs) - 1

    def _demo(self, problem) -> Sequence:
        messages = [{"role": "user", "content": problem.prompt}, {"role": "assistant", "content": problem.solution}]
        ids, mask = self.template.encode(self.tok, messages, only_last=True, where=f"rl demonstration {problem.key}")
        start = int(np.argmax(np.asarray(mask, dtype=bool)))
        limit = self.trainee.model.cfg.max_seq_len + 1
        return Sequence(np.asarray(ids[:limit], dtype=np.int64), start, 1.0, demo=True)

    def _logps(self, model) -> None:
        """Old-policy log-probs (more than one step per rollout) and reference log-probs (KL), per sequence;
        the KL penalty in the reward, when configured, then shifts the advantages' rewards."""
        rl = self.rl
        need_old = self.steps_per_rollout > 1 or (rl.kl_beta > 0 and rl.kl_in == "reward")
        need_ref = rl.kl_beta > 0
        self.old = self.ref = None
        if not (need_old or need_ref):
            return
        old, ref = [None] * len(self.seqs), [None] * len(self.seqs)
        for idx in self._order(0):
            batch = self._batch(idx).to(model.tok_embeddings.weight.device)
            counts = [self.seqs[i].trained for i in idx]
            if need_old:
                lp = model.token_logprobs(batch.inputs, batch.targets, rows=batch.target_rows)[0].float().cpu()
                for i, part in zip(idx, lp.split(counts)):
                    old[i] = part.numpy()
            if need_ref:
                lp = self.reference(model, batch).float().cpu()
                for i, part in zip(idx, lp.split(counts)):
                    ref[i] = part.numpy()
        self.old = old if self.steps_per_rollout > 1 else None
        self.ref = ref if need_ref else None
        if rl.kl_beta > 0 and rl.kl_in == "reward":
            self._kl_penalty(old, ref)

    def _kl_penalty(self, old, ref) -> None:
        """rewards - kl_beta * (summed per-token KL estimate of the sampling policy), advantages recomputed."""
        rl = self.rl
        pen = [float(kl_estimate(torch.from_numpy(o), torch.from_numpy(r), rl.kl_estimator).sum())
               for o, r in zip(old, ref)]
        rl_idx = [i for i, s in enumerate(self.seqs) if not s.demo]
        if not rl_idx:
            return
        rewards = self._rl_rewards - rl.kl_beta * torch.tensor([pen[i] for i in rl_idx], dtype=torch.float32)
        if rl.algorithm == "remax":  # the greedy baseline: the advantage moves by the penalty alone
            adv = [self.seqs[i].advantage - rl.kl_beta * pen[i] for i in rl_idx]
        else:
            adv = advantages(rewards, rl.group_size, rl.algorithm, rl.scale_rewards).tolist()
        for i, a in zip(rl_idx, adv):
            self.seqs[i].advantage = a

    # -- micro-batches -----------------------------------------------------------------------

    def _order(self, epoch: int) -> list[list[int]]:
        """The micro-batches of one pass (lists of sequence indices), mini-batch after mini-batch."""
        n = len(self.seqs)
        order = np.arange(n) if epoch == 0 else \
            np.random.default_rng(_seed(self.seed, "rl-epoch", self.rollout, epoch)).permutation(n)
        micro = []
        for mb in np.array_split(order, self.rl.mini_batches):
            micro += [part.tolist() for part in np.array_split(mb, self.accum)]
        return micro

    def _micro_batch(self, k: int, j: int) -> Batch:
        epoch, m = divmod(k, self.rl.mini_batches)
        idx = self._order(epoch)[m * self.accum + j]
        if not idx:
            raise ValueError(f"rl: a rollout of {len(self.seqs)} sequences cannot fill {self.rl.mini_batches} "
                             f"mini-batches x {self.accum} micro-batches; raise prompts_per_rollout or group_size")
        batch = self._batch(idx)
        if self.old is not None:
            batch.old_logprobs = torch.from_numpy(np.concatenate([self.old[i] for i in idx]))
        if self.ref is not None:
            batch.ref_logprobs = torch.from_numpy(np.concatenate([self.ref[i] for i in idx]))
        return batch

    def _batch(self, idx: list[int]) -> Batch:
        T = self.T
        inputs = np.full((len(idx), T), self.pad, dtype=np.int64)
        targets = np.full((len(idx), T), IGNORE_INDEX, dtype=np.int64)
        for b, i in enumerate(idx):
            s = self.seqs[i]
            L = len(s.ids) - 1
            inputs[b, :L] = s.ids[:-1]
            targets[b, s.start - 1:L] = s.ids[s.start:]
        rows = np.flatnonzero(targets.reshape(-1) != IGNORE_INDEX)
        return Batch(torch.from_numpy(inputs), torch.from_numpy(targets), target_rows=torch.from_numpy(rows),
                     advantages=torch.tensor([self.seqs[i].advantage for i in idx], dtype=torch.float32),
                     demo=torch.tensor([self.seqs[i].demo for i in idx]) if self.rl.hybrid == "hpt" else None)

    # -- the rollout in a checkpoint ---------------------------------------------------------

    def _encode(self) -> dict:
        out = {"T": self.T, "lengths": [len(s.ids) for s in self.seqs], "start": [s.start for s in self.seqs],
               "advantage": _pack(np.array([s.advantage for s in self.seqs], dtype=np.float64)),
               "demo": [s.demo for s in self.seqs],
               "ids": _pack(np.concatenate([s.ids for s in self.seqs]).astype(np.int64))}
        for name in ("old", "ref"):
            table = getattr(self, name)
            if table is not None:
                out[name] = _pack(np.concatenate(table).astype(np.float32))
        return out

    def _decode(self, buf: dict) -> None:
        ids = _unpack(buf["ids"], np.int64)
        adv = _unpack(buf["advantage"], np.float64)
        bounds = np.cumsum([0] + buf["lengths"])
        self.seqs = [Sequence(ids[bounds[i]:bounds[i + 1]], buf["start"][i], float(adv[i]), bool(buf["demo"][i]))
                     for i in range(len(buf["lengths"]))]
        self.T = buf["T"]
        counts = np.cumsum([0] + [s.trained for s in self.seqs])
        for name in ("old", "ref"):
            table = _unpack(buf[name], np.float32) if name in buf else None
            setattr(self, name, None if table is None else [table[counts[i]:counts[i + 1]]
                                                           for i in range(len(self.seqs))])
