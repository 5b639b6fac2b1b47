"""Data mixing: several caption sources -> one alignment set, plus the proxy stage's text corpus.

Seeded sampling by exact counts or by weights of a total, de-duplication, and the text-only
corpus derived from the mixed captions (the upstream code makes users hand-build it). A small
held-out slice of each source's captions is kept out of the proxy corpus, so the diagnose step
can measure the proxy's perplexity on text it did not train on.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Sequence

from .data import Record, load_llava_records
from .errors import DPAInputError
from .io import atomic_dir, write_json_atomic
from .settings import MixSource

MIX_FILE, TEXT_FILE, HOLDOUT_FILE, INFO_FILE, STATS_FILE = (
    "captions.json", "text_corpus.jsonl", "text_holdout.jsonl", "mix.json", "stats.json")


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


def dedup(records: Sequence[Record], seen: set) -> list[Record]:
    """Drop records whose (image, caption) pair was already seen (across sources too)."""
    out = []
    for r in records:
        key = (str(r.image), _normalise(r.caption))
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def allocate(sources: Sequence[MixSource], available: dict[str, int], total: int | None) -> dict[str, int]:
    """Records to draw per source: exact counts first, the rest of `total` by weight (largest remainder)."""
    want = {s.name: s.count for s in sources if s.count is not None}
    weighted = [s for s in sources if s.count is None]
    if total is None:
        want.update({s.name: available[s.name] for s in weighted})
    else:
        rest = total - sum(want.values())
        if rest < 0:
            raise DPAInputError(f"source counts add up to {sum(want.values())}, more than mix.total {total}.",
                                file="params.yaml", fix="raise mix.total or lower the counts.")
        wsum = sum(s.weight for s in weighted) or 1.0
        exact = {s.name: rest * s.weight / wsum for s in weighted}
        floor = {k: int(v) for k, v in exact.items()}
        for k in sorted(exact, key=lambda k: floor[k] - exact[k])[: rest - sum(floor.values())]:
            floor[k] += 1
        want.update(floor)
    for s in sources:
        if want[s.name] > available[s.name]:
            raise DPAInputError(f"source {s.name!r} has {available[s.name]} records after de-duplication, "
                                f"{want[s.name]} asked for.", file=s.path,
                                fix="lower its count/weight or mix.total, or add data.")
    return want


def check_sources(sources: Sequence[tuple[Path, Path]], *, image_token: str = "<image>",
                  require_image: bool = True) -> int:
    """Validate LLaVA-format sources [(path, image_root)] in full (every record, every image: exists,
    inside its root, readable, one image marker); returns the number of records. Instruction data may
    hold text-only records (require_image=False), as the finetune stage reads it."""
    return sum(len(load_llava_records(path, root, image_token=image_token, require_image=require_image))
               for path, root in sources)


def mix_captions(sources: Sequence[MixSource], out_dir: str | os.PathLike, *, total: int | None = None,
                 seed: int = 0, dedup_records: bool = True, holdout: int = 64) -> dict:
    """Write the mixed caption set, the proxy text corpus, a text hold-out and stats; return the stats."""
    rng = random.Random(seed)
    seen: set = set()
    pools, raw_counts = {}, {}
    for s in sources:
        recs = load_llava_records(s.path, s.image_root)
        raw_counts[s.name] = len(recs)
        pools[s.name] = dedup(recs, seen) if dedup_records else recs
    take = allocate(sources, {k: len(v) for k, v in pools.items()}, total)
    root = Path(os.path.commonpath([str(Path(s.image_root).resolve()) for s in sources]))
    mixed, texts, held = [], [], []
    for s in sources:
        chosen = rng.sample(pools[s.name], take[s.name])
        n_hold = min(holdout, len(chosen) // 10)
        if holdout and not n_hold:
            raise DPAInputError(f"source {s.name!r} gets {len(chosen)} records, too few to hold any out for the "
                                "diagnose stage (it holds out a tenth, at least 10 records are needed).",
                                file="params.yaml", fix="raise mix.total or this source's count/weight.")
        for i, r in enumerate(chosen):
            rid = f"{s.name}/{r.id}"
            mixed.append({"id": rid, "source": s.name, "image": str(r.image.relative_to(root)),
                          "conversations": [{"from": "human" if role == "user" else "gpt", "value": text}
                                            for role, text in r.turns]})
            (held if i < n_hold else texts).append({"id": rid, "source": s.name, "text": r.caption.strip()})
    rng.shuffle(mixed)
    stats = {
        "total": len(mixed),
        "text_corpus": len(texts),
        "holdout": len(held),
        **{f"sources/{k}/raw": v for k, v in raw_counts.items()},
        **{f"sources/{k}/after_dedup": len(v) for k, v in pools.items()},
        **{f"sources/{k}/taken": v for k, v in take.items()},
        **{f"sources/{k}/share": v / max(len(mixed), 1) for k, v in take.items()},
        "mean_caption_words": sum(len(t["text"].split()) for t in texts + held) / max(len(texts) + len(held), 1),
    }
    with atomic_dir(out_dir) as tmp:
        write_json_atomic(tmp / MIX_FILE, mixed)
        (tmp / TEXT_FILE).write_text("".join(_jsonl(t) for t in texts), encoding="utf-8")
        (tmp / HOLDOUT_FILE).write_text("".join(_jsonl(t) for t in held), encoding="utf-8")
        write_json_atomic(tmp / INFO_FILE, {"image_root": os.path.relpath(root), "sources": [s.name for s in sources],
                                            "seed": seed})
        write_json_atomic(tmp / STATS_FILE, stats)
    return stats


def _jsonl(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False) + "\n"
