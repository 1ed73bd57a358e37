"""Media decoding cost on the synthetic omni suite: per item, cached, and a whole split screened.

Usage: python benchmarks/media_decode.py DATA_DIR   (DATA_DIR from `harpo init-tiny --omni`)
"""

from __future__ import annotations

import sys
import time

from harpo_core.data import DataColumns, load_prompts
from harpo_core.media import MediaCache, MediaLimits, decode
from harpo_core.media_check import screen_media


def main(data_dir: str) -> None:
    t0 = time.perf_counter()
    prompts = load_prompts(data_dir, "train", columns=DataColumns.hba(),
                           default_task_type="classification")
    print(f"load {len(prompts)} rows: {time.perf_counter() - t0:.3f} s")
    limits = MediaLimits(video_fps=4.0)
    for kind in ("image", "audio", "video"):
        items = [x for r in range(len(prompts)) for x in prompts.media_items(r)[kind]][:100]
        t0 = time.perf_counter()
        for item in items:
            decode(kind, item, limits)
        cold = (time.perf_counter() - t0) / len(items)
        cache = MediaCache(limits)
        for item in items:
            cache.get(kind, item)
        t0 = time.perf_counter()
        for item in items:
            cache.get(kind, item)
        hit = (time.perf_counter() - t0) / len(items)
        size = sum(len(i) for i in items) / len(items)
        print(f"{kind}: {len(items)} items of {size:.0f} B: decode {cold * 1e3:.2f} ms/item, "
              f"cache hit {hit * 1e3:.3f} ms/item")
    t0 = time.perf_counter()
    screen = screen_media(prompts, limits)
    print(f"screen {len(prompts)} rows ({screen.decoded_items} media items): "
          f"{time.perf_counter() - t0:.2f} s")


if __name__ == "__main__":
    main(sys.argv[1])
