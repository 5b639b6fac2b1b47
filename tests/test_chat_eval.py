"""`dpa chat` and `dpa eval` on real (tiny, random) Llava checkpoints: one in the stock llava-hf
layout built from configs, and this project's own (build_llava, as the merge stage writes it).
The same commands on the smoke world's merged models are checked in test_pipeline_e2e.py."""

from __future__ import annotations

import io
import json

import pytest

from dpa_core.chat import LlavaChat, load_image
from dpa_core.errors import DPAInputError
from dpa_core.evaluation import evaluate_all
from dpa_core.evaluation.tsv_benchmark import write_benchmark_tsv
from pipelines.cli import benchmark_specs, main
from tests.test_evaluation_lmeval import write_facts
from tests.test_evaluation_vlmeval import toy_rows
from tests.tiny_models import make_images, make_stock_llava


@pytest.fixture(scope="module")
def stock_llava(tmp_path_factory):
    return make_stock_llava(tmp_path_factory.mktemp("stock") / "llava-hf-tiny")


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    root = tmp_path_factory.mktemp("img")
    return root / make_images(root, 1)[0]


@pytest.mark.parametrize("which", ["stock", "project"])
def test_streamed_reply_is_the_greedy_generation(which, stock_llava, tiny_llava_dir, image):
    """What streams out is exactly what generate() returns for the rendered prompt and the image."""
    model_dir = stock_llava if which == "stock" else tiny_llava_dir
    chat = LlavaChat(model_dir, device="cpu")
    chat.reset(load_image(image))
    text = chat.prompt_text("what is in the image?")
    chunks: list[str] = []
    reply = chat.ask("what is in the image?", max_new_tokens=6, stream=chunks.append)
    assert len(chunks) >= 1 and "".join(chunks).strip() == reply

    inputs = chat.processor(text=[text], images=[chat.image], return_tensors="pt")
    assert (inputs["input_ids"] == chat.model.config.image_token_id).sum() > 0, "the image is in the prompt"
    out = chat.model.generate(**inputs, max_new_tokens=6, do_sample=False,
                              pad_token_id=chat.tokenizer.pad_token_id)
    expected = chat.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert reply == expected


def test_second_turn_carries_the_conversation(stock_llava, image):
    chat = LlavaChat(stock_llava, device="cpu")
    chat.reset(load_image(image))
    first = chat.ask("what colour?", max_new_tokens=4)
    text = chat.prompt_text("and the shape?")
    assert text.count("<image>") == 1 and text.index("what colour?") < text.index(first) < text.index("and the shape?")
    assert text.startswith("USER: <image>\n") and text.endswith("ASSISTANT:")
    chat.reset()
    assert chat.prompt_text("hi") == "USER: <image>\nhi ASSISTANT:"


def test_checkpoint_without_chat_template_uses_llava_15_format(tmp_path, image):
    model_dir = make_stock_llava(tmp_path / "bare", chat_template=False)
    chat = LlavaChat(model_dir, device="cpu")
    chat.reset(load_image(image))
    assert chat.template.startswith("llava-1.5")
    assert chat.prompt_text("what?") == "USER: <image>\nwhat? ASSISTANT:"
    assert isinstance(chat.ask("what?", max_new_tokens=3), str)


def test_chat_cli_one_shot_and_interactive(stock_llava, image, capsys, monkeypatch):
    assert main(["chat", str(stock_llava), "--image", str(image), "--prompt", "hello", "--max-new-tokens", "4",
                 "--device", "cpu"]) == 0
    one_shot = capsys.readouterr().out
    chat = LlavaChat(stock_llava, device="cpu")
    chat.reset(load_image(image))
    assert one_shot.strip() == chat.ask("hello", max_new_tokens=4)

    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/reset\nhello\n/image nowhere.png\n/exit\n"))
    assert main(["chat", str(stock_llava), "--image", str(image), "--max-new-tokens", "4", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.count("model> ") == 2 and "new conversation" in out
    assert "image not found" in out  # a bad /image keeps the session going


def test_chat_cli_bad_inputs(stock_llava, image, tmp_path, capsys):
    assert main(["chat", str(stock_llava), "--image", str(tmp_path / "missing.png"), "--prompt", "hi"]) == 2
    assert "image not found" in capsys.readouterr().err
    (tmp_path / "not_an_image.png").write_text("hello")
    assert main(["chat", str(stock_llava), "--image", str(tmp_path / "not_an_image.png"), "--prompt", "hi"]) == 2
    assert "not a readable image" in capsys.readouterr().err
    qwen = tmp_path / "qwen"
    qwen.mkdir()
    (qwen / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    with pytest.raises(DPAInputError, match="not a Llava checkpoint"):
        LlavaChat(qwen, device="cpu")
    assert main(["chat", str(tmp_path / "nowhere"), "--image", str(image), "--prompt", "hi"]) == 2
    assert "not a saved model directory" in capsys.readouterr().err


def test_eval_cli_prints_the_same_scores_as_evaluate_all(stock_llava, tmp_path, capsys):
    tsv = write_benchmark_tsv(toy_rows(4), tmp_path / "toy_mcq.tsv")
    facts = write_facts(tmp_path / "facts.jsonl")
    assert main(["eval", str(stock_llava), "--benchmark", str(tsv), "--benchmark", str(facts),
                 "--out", str(tmp_path / "cli"), "--params", str(tmp_path / "none.yaml"), "--device", "cpu",
                 "--batch-size", "2", "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out
    cli = json.loads((tmp_path / "cli" / "scores.json").read_text())
    direct = evaluate_all(stock_llava, [{"name": "toy_mcq", "kind": "builtin_tsv", "path": str(tsv)},
                                        {"name": "facts", "kind": "lmeval", "path": str(facts)}],
                          tmp_path / "direct", batch_size=2, max_new_tokens=4, device="cpu")
    assert {k: v for k, v in cli.items() if not k.endswith("seconds")} == \
        {k: v for k, v in direct.items() if not k.endswith("seconds")}
    assert f"| toy_mcq/overall | {100 * cli['toy_mcq/overall']:.1f} |" in printed
    assert f"| facts/acc | {100 * cli['facts/acc']:.1f} |" in printed
    average = (cli["toy_mcq/overall"] + cli["facts/acc"]) / 2
    assert f"| average | {100 * average:.1f} |" in printed


def test_eval_benchmark_choices(tmp_path):
    from pipelines.params import load_params

    from tests.e2e_helpers import REPO

    p = load_params(REPO / "params.yaml")
    assert [b["name"] for b in benchmark_specs(None, p)] == [b.name for b in p.evaluate.benchmarks]
    assert benchmark_specs(["text_facts"], p)[0]["kind"] == "lmeval"
    assert benchmark_specs(["lmeval:arc_easy"], None) == [{"name": "arc_easy", "kind": "lmeval", "task": "arc_easy"}]
    with pytest.raises(DPAInputError, match="unknown benchmark"):
        benchmark_specs(["mmbench"], p)
    with pytest.raises(DPAInputError, match="not found"):
        benchmark_specs([str(tmp_path / "x.tsv")], None)
    with pytest.raises(DPAInputError, match="no benchmarks"):
        benchmark_specs(None, None)
