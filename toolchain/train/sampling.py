"""Batch sampling for the hypernetwork: random batches and K-means Centered Sampling (KCS).

A batch is P identities; each gives one enrollment image (its cached h_bb embedding drives h_gen)
and m probe images (run through the verifier's trunk). Every enrollment/probe combination is
scored, so a batch holds P*m positives and P*m*(P-1) negatives.

KCS, step by step:
1. identity centres: the mean of the L2-normalised h_bb embeddings of each training identity,
   normalised again (h_bb is frozen, so this is computed once);
2. k-means over the centres with k = round(n_identities / P), so a cluster holds about one
   batch of identities; re-run every `recluster_every` steps with a new seed (the seed is a
   function of the step, so a resumed run gets the same clusters) to vary the groupings;
3. a KCS batch picks one cluster (probability proportional to its size) and takes P of its
   identities at random; a cluster smaller than P is topped up with the identities whose
   centres are nearest to that cluster's centroid. The batch's negatives are look-alikes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.cluster import KMeans


def identity_centres(embeddings: torch.Tensor, labels: np.ndarray, identities: np.ndarray) -> np.ndarray:
    """L2-normalised mean embedding of each identity in `identities` -> (K, D) float32."""
    emb = torch.nn.functional.normalize(embeddings.float(), dim=1).numpy()
    centres = np.stack([emb[labels == ident].mean(0) for ident in identities])
    return (centres / np.linalg.norm(centres, axis=1, keepdims=True).clip(1e-12)).astype(np.float32)


@dataclass
class Batch:
    identities: np.ndarray  # (P,) identity labels
    enroll: np.ndarray  # (P,) item indices of the enrollment images
    probes: np.ndarray  # (P*m,) item indices of the probe images
    probe_owner: np.ndarray  # (P*m,) row (0..P-1) of the identity each probe belongs to


class IdentityBatchSampler:
    def __init__(self, labels: np.ndarray, identities: np.ndarray, centres: np.ndarray, identities_per_batch: int,
                 probes_per_identity: int, seed: int = 0, recluster_every: int = 200) -> None:
        self.labels = np.asarray(labels)
        self.identities = np.asarray(identities)
        self.centres = centres
        self.p = min(identities_per_batch, len(self.identities))
        self.m = probes_per_identity
        self.seed, self.recluster_every = seed, recluster_every
        self.items = {int(i): np.flatnonzero(self.labels == i) for i in self.identities}
        if self.p < 2:
            raise ValueError("need at least 2 identities with 2 images each")
        self._clusters: tuple[int, list[np.ndarray], np.ndarray] | None = None

    # -- identity choice -------------------------------------------------------------------
    def random_identities(self, rng: np.random.Generator) -> np.ndarray:
        return rng.choice(len(self.identities), size=self.p, replace=False)

    def clusters(self, step: int) -> tuple[list[np.ndarray], np.ndarray]:
        """(members of each cluster as rows into `identities`, centroids) for this step's round."""
        round_ = step // self.recluster_every
        if self._clusters is None or self._clusters[0] != round_:
            k = max(1, int(round(len(self.identities) / self.p)))
            km = KMeans(n_clusters=k, n_init=1, random_state=(self.seed * 7919 + round_) % 2**31)
            assign = km.fit_predict(self.centres)
            members = [np.flatnonzero(assign == c) for c in range(k)]
            self._clusters = (round_, members, km.cluster_centers_)
        return self._clusters[1], self._clusters[2]

    def kcs_identities(self, rng: np.random.Generator, step: int) -> np.ndarray:
        members, centroids = self.clusters(step)
        sizes = np.array([len(m) for m in members], dtype=np.float64)
        c = rng.choice(len(members), p=sizes / sizes.sum())
        chosen = members[c]
        if len(chosen) >= self.p:
            return rng.choice(chosen, size=self.p, replace=False)
        # Top up with the identities nearest to this cluster's centroid.
        order = np.argsort(-(self.centres @ centroids[c]))
        extra = [i for i in order if i not in set(chosen.tolist())][: self.p - len(chosen)]
        return np.concatenate([chosen, np.array(extra, dtype=chosen.dtype)])

    # -- images -----------------------------------------------------------------------------
    def images_for(self, rows: np.ndarray, rng: np.random.Generator) -> Batch:
        enroll, probes, owner = [], [], []
        for r, row in enumerate(rows):
            items = self.items[int(self.identities[row])]
            pick = rng.permutation(items)
            enroll.append(pick[0])
            rest = pick[1:]
            chosen = rest[: self.m] if len(rest) >= self.m else rng.choice(rest, size=self.m, replace=True)
            probes.extend(chosen.tolist())
            owner.extend([r] * self.m)
        return Batch(self.identities[rows], np.array(enroll), np.array(probes), np.array(owner))

    def sample(self, rng: np.random.Generator, step: int, use_kcs: bool) -> Batch:
        rows = self.kcs_identities(rng, step) if use_kcs else self.random_identities(rng)
        return self.images_for(rows, rng)


def mean_negative_cosine(embeddings: torch.Tensor, batch: Batch) -> float:
    """Mean cosine similarity, in h_bb's embedding space, of the batch's negative pairs
    (enrollment image of user i vs probe of user j != i): higher = harder negatives."""
    e = torch.nn.functional.normalize(embeddings.float(), dim=1)
    sim = e[torch.as_tensor(batch.enroll)] @ e[torch.as_tensor(batch.probes)].T
    neg = torch.as_tensor(batch.probe_owner)[None, :] != torch.arange(len(batch.enroll))[:, None]
    return float(sim[neg].mean())
