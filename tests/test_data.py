"""Data: record validation (bad input fails up front with a useful message), encoding, collation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dpa_core.data import Collator, Encoder, MultimodalDataset, Record, load_llava_records, load_text_records
from dpa_core.errors import DPAInputError
from dpa_core.losses import IGNORE_INDEX
from dpa_core.modeling import load_tokenizer

N_IMG = 16


@pytest.fixture(scope="module")
def tok(tiny_paths):
    return load_tokenizer(tiny_paths["llm"])


def _good(i: int, image: str = "img0.png") -> dict:
    return {"id": f"ok{i}", "image": image,
            "conversations": [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "a red circle"}]}


def _write(path: Path, records: list) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    else:
        path.write_text(json.dumps(records))
    return path


@pytest.fixture()
def images(tiny_paths, tmp_path):
    root = tmp_path / "images"
    shutil.copytree(tiny_paths["images"], root)
    return root


# --- 7. bad records: each names the file, the record and the fix -----------------------------------

def _bad_cases(root: Path, tmp: Path):
    outside = tmp / "outside.png"
    shutil.copy(root / "img1.png", outside)
    (root / "broken.png").write_bytes(b"this is not a png at all \x00\x01\x02" * 10)
    (root / "link.png").symlink_to(outside)
    human_answer = lambda a: [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": a}]
    return {
        "missing image": ({"id": "bad", "image": "nope.png", "conversations": human_answer("x")}, "does not exist"),
        "unreadable image": ({"id": "bad", "image": "broken.png", "conversations": human_answer("x")}, "unreadable"),
        "dot-dot escape": ({"id": "bad", "image": "../outside.png", "conversations": human_answer("x")}, "escapes"),
        "absolute path": ({"id": "bad", "image": str(outside), "conversations": human_answer("x")}, "escapes"),
        "symlink escape": ({"id": "bad", "image": "link.png", "conversations": human_answer("x")}, "escapes"),
        "no marker": ({"id": "bad", "image": "img0.png",
                       "conversations": [{"from": "human", "value": "Describe."}, {"from": "gpt", "value": "x"}]},
                      "<image>"),
        "two markers": ({"id": "bad", "image": "img0.png",
                         "conversations": [{"from": "human", "value": "<image>\n<image> Describe."},
                                           {"from": "gpt", "value": "x"}]}, "exactly one"),
        "empty answer": ({"id": "bad", "image": "img0.png", "conversations": human_answer("   ")}, "empty answer"),
        "no answer": ({"id": "bad", "image": "img0.png",
                       "conversations": [{"from": "human", "value": "<image>\nDescribe."}]}, "without an answer"),
        "no image": ({"id": "bad", "conversations": human_answer("x")}, "no 'image'"),
        "duplicate id": ({**_good(1), "id": "ok0"}, "duplicate"),
    }


CASES = ["missing image", "unreadable image", "dot-dot escape", "absolute path", "symlink escape", "no marker",
         "two markers", "empty answer", "no answer", "no image", "duplicate id"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_bad_record_is_reported_with_file_record_and_fix(case, suffix, images, tmp_path):
    raw, what = _bad_cases(images, tmp_path)[case]
    # The bad record comes last, after good ones: the whole file is validated when loaded.
    path = _write(tmp_path / f"data{suffix}", [_good(0), _good(1, "img2.png"), raw])
    with pytest.raises(DPAInputError) as e:
        load_llava_records(path, images)
    msg = str(e.value)
    rid = raw["id"]
    assert str(path) in msg, msg
    assert f"record {rid!r}" in msg, msg
    assert what in msg, msg
    assert "Fix:" in msg and len(msg.split("Fix:")[1].strip()) > 10, msg
    assert e.value.file == path and e.value.record == rid


def test_good_records_load(images, tmp_path):
    outside = tmp_path / "outside.png"
    shutil.copy(images / "img1.png", outside)
    (images / "sub").mkdir()
    shutil.copy(images / "img2.png", images / "sub" / "x.png")
    recs = [_good(0), _good(1, "sub/x.png"), _good(2, "sub/../img3.png")]  # '..' that stays inside is fine
    out = load_llava_records(_write(tmp_path / "d.json", recs), images)
    assert [r.image for r in out] == [images.resolve() / "img0.png", images.resolve() / "sub" / "x.png",
                                      images.resolve() / "img3.png"]


def test_json_and_jsonl_inputs_give_the_same_records(images, tmp_path):
    recs = [_good(0),
            {"id": 7, "image": "img1.png",  # ids may be numbers; roles may be user/assistant with content
             "conversations": [{"role": "user", "content": "<image>\nwhat colour?"},
                               {"role": "assistant", "content": "red."},
                               {"from": "human", "value": "how many?"}, {"from": "gpt", "value": "three."}]}]
    a = load_llava_records(_write(tmp_path / "d.json", recs), images)
    b = load_llava_records(_write(tmp_path / "d.jsonl", recs), images)
    strip = lambda rs: [(r.id, r.image, r.turns) for r in rs]
    assert strip(a) == strip(b)
    assert a[1].id == "7"
    assert a[1].turns == (("user", "<image>\nwhat colour?"), ("assistant", "red."), ("user", "how many?"),
                          ("assistant", "three."))


def test_malformed_files(images, tmp_path):
    bad_line = tmp_path / "d.jsonl"
    bad_line.write_text(json.dumps(_good(0)) + "\n{not json\n")
    with pytest.raises(DPAInputError, match="line 2") as e:
        load_llava_records(bad_line, images)
    assert str(bad_line) in str(e.value)
    not_list = tmp_path / "d.json"
    not_list.write_text(json.dumps(_good(0)))
    with pytest.raises(DPAInputError, match="list"):
        load_llava_records(not_list, images)
    with pytest.raises(DPAInputError, match="not found"):
        load_llava_records(tmp_path / "missing.json", images)
    empty = _write(tmp_path / "e.json", [])
    with pytest.raises(DPAInputError, match="no records"):
        load_llava_records(empty, images)
    with pytest.raises(DPAInputError, match="not a directory"):
        load_llava_records(_write(tmp_path / "f.json", [_good(0)]), tmp_path / "nope")


def test_text_records(tmp_path):
    good = tmp_path / "t.jsonl"
    good.write_text('{"id": "a", "text": "a red circle"}\n\n{"id": "b", "text": "two squares"}\n')
    assert [r["text"] for r in load_text_records(good)] == ["a red circle", "two squares"]
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"id": "a", "text": "a red circle"}\n{"id": "empty", "text": "  "}\n')
    with pytest.raises(DPAInputError) as e:
        load_text_records(bad)
    assert str(bad) in str(e.value) and "record 'empty'" in str(e.value) and "Fix:" in str(e.value)


# --- 9. encoding -------------------------------------------------------------------------------------

def _runs(ids, labels):
    """Contiguous runs of labelled tokens."""
    runs, cur = [], []
    for t, lab in zip(ids.tolist(), labels.tolist()):
        if lab != IGNORE_INDEX:
            assert lab == t
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


def test_chat_labels_assistant_turns_only(tok, tiny_paths):
    rec = Record("q", tiny_paths["images"] / "img0.png",
                 (("user", "<image>\nwhat colour?"), ("assistant", "it is red."), ("user", "how many?"),
                  ("assistant", "three.")), "mem")
    ex = Encoder(tok, "<image>", N_IMG).chat(rec)
    ids, labels = ex["input_ids"], ex["labels"]
    image_id = tok.convert_tokens_to_ids("<image>")
    is_img = ids == image_id
    assert int(is_img.sum()) == N_IMG
    pos = is_img.nonzero().view(-1)
    assert torch.equal(pos, torch.arange(int(pos[0]), int(pos[0]) + N_IMG))  # one contiguous block
    assert (labels[is_img] == IGNORE_INDEX).all()
    # The ChatML rendering, written out by hand (one <image> standing for the 16 image tokens).
    collapsed = torch.cat([ids[: pos[0] + 1], ids[pos[-1] + 1:]])
    assert tok.decode(collapsed) == ("<|im_start|>user\n<image>\nwhat colour?<|im_end|>\n"
                                     "<|im_start|>assistant\nit is red.<|im_end|>\n"
                                     "<|im_start|>user\nhow many?<|im_end|>\n"
                                     "<|im_start|>assistant\nthree.<|im_end|>\n")
    # Loss on the answers and their end-of-turn token (and the newline the template puts after it).
    assert [tok.decode(r) for r in _runs(ids, labels)] == ["it is red.<|im_end|>\n", "three.<|im_end|>\n"]
    assert tok.eos_token == "<|im_end|>"


def test_plain_labels_caption_only(tok, tiny_paths):
    rec = Record("c", tiny_paths["images"] / "img0.png",
                 (("user", "<image>\nDescribe the picture in detail."), ("assistant", "  a red circle on the left ")),
                 "mem")
    ex = Encoder(tok, "<image>", N_IMG).plain(rec)
    ids, labels = ex["input_ids"], ex["labels"]
    image_id = tok.convert_tokens_to_ids("<image>")
    # image first (no BOS in this tokenizer), the prompt is not used, then the stripped caption + EOS
    assert ids[:N_IMG].tolist() == [image_id] * N_IMG and int((ids == image_id).sum()) == N_IMG
    assert (labels[:N_IMG] == IGNORE_INDEX).all()
    assert [tok.decode(r) for r in _runs(ids, labels)] == ["a red circle on the left<|im_end|>"]
    assert ids[N_IMG:].tolist() == tok("a red circle on the left", add_special_tokens=False)["input_ids"] + [
        tok.eos_token_id]


def test_text_encoding_labels_everything(tiny_paths):
    tok = load_tokenizer(tiny_paths["llm"], image_token=None)
    ex = Encoder(tok).text("two yellow circles")
    assert torch.equal(ex["input_ids"], ex["labels"])
    assert tok.decode(ex["input_ids"]) == "two yellow circles<|im_end|>"


def test_max_length_through_the_image_is_an_error(tok, tiny_paths):
    rec = Record("long", tiny_paths["images"] / "img0.png", (("user", "<image>\nx"), ("assistant", "y")), "mem")
    with pytest.raises(DPAInputError, match="max_length") as e:
        Encoder(tok, "<image>", N_IMG, max_length=10).plain(rec)
    assert "record 'long'" in str(e.value)
    ex = Encoder(tok, "<image>", N_IMG, max_length=N_IMG + 2).plain(rec)  # cutting the caption is fine
    assert len(ex["input_ids"]) == N_IMG + 2


def test_dataset_items(tok, tiny_paths):
    from dpa_core.modeling import build_processor

    proc = build_processor(tiny_paths["clip"], tok)
    rec = Record("c", tiny_paths["images"] / "img3.png", (("user", "<image>\nx"), ("assistant", "a red circle")), "mem")
    item = MultimodalDataset([rec], Encoder(tok, "<image>", N_IMG).plain, proc.image_processor)[0]
    assert item["pixel_values"].shape == (3, 16, 16)


def test_collator_padding_sides():
    a = {"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([-100, 6, 7]), "pixel_values": torch.zeros(3, 2, 2)}
    b = {"input_ids": torch.tensor([8, 9, 10, 11, 12]), "labels": torch.tensor([-100, -100, 10, 11, 12]),
         "pixel_values": torch.ones(3, 2, 2)}
    right = Collator(pad_token_id=0)([a, b])
    assert right["input_ids"].tolist() == [[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]]
    assert right["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert right["labels"].tolist() == [[-100, 6, 7, -100, -100], [-100, -100, 10, 11, 12]]
    left = Collator(pad_token_id=0, padding_side="left")([a, b])
    assert left["input_ids"].tolist() == [[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]]
    assert left["attention_mask"].tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert left["labels"].tolist() == [[-100, -100, -100, 6, 7], [-100, -100, 10, 11, 12]]
    assert right["pixel_values"].shape == (2, 3, 2, 2) and right["pixel_values"][1].eq(1).all()
    text = Collator(pad_token_id=3)([{"input_ids": torch.tensor([1]), "labels": torch.tensor([1])}])
    assert "pixel_values" not in text and text["input_ids"].tolist() == [[1]]
