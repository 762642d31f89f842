"""Content clusters from caption embeddings, and the per-cluster sampling weights of the mixture.

Embeddings: a local sentence-embedding model directory when given (through ``sentence-transformers``
when installed, else transformers' ``AutoModel`` with mean pooling over the tokens), else TF-IDF
(weights-free). k-means (scikit-learn, seeded) into at most ``k`` clusters, numbered in
order of first appearance over the clip ids so the numbering is stable. Weights: cluster c gets the
mixture ratio ``n_c ** balance / sum_d n_d ** balance`` (balance 0 = every cluster equally often,
1 = as found) and each of its clips the sampling weight ``ratio_c / n_c``.
"""

from __future__ import annotations

import logging
import os
from typing import Optional, Sequence

import numpy as np

log = logging.getLogger("data_loaders.curate")


def embed(texts: Sequence[str], model_dir: Optional[str]) -> tuple[object, str, Optional[str]]:
    """(matrix, method, why the model was skipped or None)."""
    why = None
    if model_dir:
        try:
            return _model_embeddings(list(texts), model_dir), "sentence-embedding", None
        except Exception as e:  # noqa: BLE001
            why = f"embedder: cannot use {model_dir}: {type(e).__name__}: {e}; using TF-IDF"
            log.warning("curate: %s", why)
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(lowercase=True, token_pattern=r"(?u)\b\w+\b").fit_transform(list(texts)), "tfidf", why


def _model_embeddings(texts: list[str], model_dir: str, batch: int = 64) -> np.ndarray:
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"no model directory at {model_dir}")
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        SentenceTransformer = None
    if SentenceTransformer is not None:
        return np.asarray(SentenceTransformer(model_dir, device="cpu").encode(texts, normalize_embeddings=True))
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(model_dir), AutoModel.from_pretrained(model_dir).eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            enc = tok(texts[i:i + batch], padding=True, truncation=True, return_tensors="pt")
            h = model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp_min(1), dim=-1).numpy())
    return np.concatenate(out)


def kmeans_labels(x, k: int, seed: int) -> np.ndarray:
    from sklearn.cluster import KMeans

    n = x.shape[0]
    k = max(1, min(k, n))
    if k == 1:
        return np.zeros(n, np.int64)
    raw = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x)
    order: dict[int, int] = {}
    for v in raw:  # renumber by first appearance
        order.setdefault(int(v), len(order))
    return np.array([order[int(v)] for v in raw], np.int64)


def cluster_ratios(labels: np.ndarray, balance: float) -> dict[int, float]:
    ids, counts = np.unique(labels, return_counts=True)
    w = counts.astype(np.float64) ** balance
    w /= w.sum()
    return {int(i): float(r) for i, r in zip(ids, w)}
