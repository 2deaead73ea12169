"""configs/qwen25_05b_siglip_anyres: the OneVision-style schedule is single-image -> mixed (single + multi + video),
as issue 12 asks, and the mixed stage's token budget holds its longest video (32 frames of SigLIP-384)."""

from __future__ import annotations

from pathlib import Path

from llavakit.model.video import video_token_count
from llavakit.train.config import load_config

FOLDER = Path(__file__).resolve().parents[1] / "configs" / "qwen25_05b_siglip_anyres"


def test_the_mixed_stage_has_single_multi_and_video_sources():
    si = load_config(FOLDER / "stage2_onevision_si.yaml")
    ov = load_config(FOLDER / "stage3_onevision_ov.yaml")
    assert isinstance(si.data.train, str)  # single images only
    assert ov.model.init_from == str(Path(si.train.output_dir) / "model")
    sources = {s["name"]: s for s in ov.data.train}
    assert set(sources) == {"single", "multi", "video"}
    assert sources["video"]["path"].endswith("video.json") and sources["video"]["image_folder"]
    # videos need anyres_max (the <video> token and OneVision's video rule), in both stages
    assert si.model.image_tokens == ov.model.image_tokens == "anyres_max"
    # 32 sampled frames (the processor's default) of a 27 x 27 feature grid: 32 x 14 x 14 + 1 tokens, room for text
    assert video_token_count(32, 27) == 6273 and ov.data.max_length >= 6273 + 256
