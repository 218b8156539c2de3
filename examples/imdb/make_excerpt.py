"""Rebuild the IMDB excerpt shipped here from the full copy: python examples/imdb/make_excerpt.py ../shared/data/imdb

A seeded, label-balanced sample (1,000 + 1,000 training reviews, 500 + 500 test reviews) of the Large Movie Review
Dataset (Maas et al., ACL 2011), fields unchanged. predict.jsonl: 20 further test reviews with the label removed.
"""

import json
import random
import sys
from pathlib import Path

src = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/imdb")
out = Path(__file__).parent
rng = random.Random(0)


def sample(split: str, per_label: int, extra: int = 0) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in open(src / f"{split}.jsonl", encoding="utf-8")]
    by_label = {0: [r for r in rows if r["label"] == 0], 1: [r for r in rows if r["label"] == 1]}
    picked, rest = [], []
    for group in by_label.values():
        rng.shuffle(group)
        picked += group[:per_label]
        rest += group[per_label : per_label + extra // 2]
    rng.shuffle(picked)
    return picked, rest


def write(name: str, rows: list[dict]) -> None:
    with open(out / name, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


train, _ = sample("train", 1000)
test, spare = sample("test", 500, extra=20)
write("train.jsonl", train)
write("test.jsonl", test)
write("predict.jsonl", [{"id": r["id"], "text": r["text"]} for r in spare])
