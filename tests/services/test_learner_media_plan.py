"""How the media learner names and orders its passes (pure: no model, no Ray): a prompt's
modality signature from its tensors, several rows' tensors concatenated in row order, ranks
agreeing on the passes of each signature."""

import pytest
import torch

from harpo_core.micro_batches import RowMicroBatch, plan_modality_micro_batches
from services.learner_media import (
    align_passes,
    collate_media,
    media_signature,
    signature_counts,
)


def test_signature_of_a_prompts_tensors():
    assert media_signature(None) == media_signature({}) == "text"
    assert media_signature({"pixel_values": 0, "image_grid_thw": 0}) == "text_image"
    assert media_signature({"pixel_values_videos": 0, "input_features": 0,
                            "pixel_values": 0}) == "text_image_audio_video"


def test_rows_tensors_are_concatenated_in_row_order():
    a = {"pixel_values": torch.zeros(4, 3), "image_grid_thw": torch.tensor([[1, 2, 2]])}
    b = {"pixel_values": torch.ones(16, 3), "image_grid_thw": torch.tensor([[1, 4, 4]])}
    out = collate_media([b, a, b])
    assert out["pixel_values"].shape == (36, 3)
    assert out["pixel_values"][:16].eq(1).all() and out["pixel_values"][16:20].eq(0).all()
    assert out["image_grid_thw"].tolist() == [[1, 4, 4], [1, 2, 2], [1, 4, 4]]


def test_ranks_run_the_same_signature_in_every_pass():
    """Two ranks hold the same prompts with different response lengths: under a token budget
    rank 0 plans 2 image passes and rank 1 one; aligned, both run text, image, image, video."""
    signatures = ["text_image", "text_image", "text", "text_video"]
    rank0 = plan_modality_micro_batches([9, 8, 3, 20], signatures, max_tokens=12,
                                        by_length=True)
    rank1 = plan_modality_micro_batches([5, 6, 4, 21], signatures, max_tokens=12,
                                        by_length=True)
    for plan in (rank0, rank1):
        plan.sort(key=lambda m: signature_counts([m]).index(1))  # as the learner orders them
    most = [max(a, b) for a, b in zip(signature_counts(rank0), signature_counts(rank1))]
    assert signature_counts(rank1) != most  # rank 1 would run one pass fewer
    aligned = [align_passes(plan, lengths, most, rank) for rank, (plan, lengths) in
               enumerate(((rank0, [9, 8, 3, 20]), (rank1, [5, 6, 4, 21])))]
    assert [m.signature for m in aligned[0]] == [m.signature for m in aligned[1]] == [
        "text", "text_image", "text_image", "text_video"]
    assert aligned[1][1:3] == [RowMicroBatch((1,), 6, "text_image"),
                               RowMicroBatch((0,), 5, "text_image")]
    with pytest.raises(ValueError, match="rank 1 has no rows of a modality signature but "
                                         "another rank runs 1 pass.*group_size must be a "
                                         "multiple of learner.workers"):
        align_passes(rank1[:1], [5, 6, 4, 21], [1, 0, 0, 0, 1, 0, 0, 0], rank=1)
    with pytest.raises(ValueError, match="1 row\\(s\\) of modality signature 'text' but "
                                         "another rank runs 2"):
        align_passes(rank1[:1], [5, 6, 4, 21], [2, 0, 0, 0, 0, 0, 0, 0], rank=1)
