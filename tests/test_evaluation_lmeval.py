"""Text abilities through lm-eval: the LLM of a Llava checkpoint (extracted, or built in memory), the local multiple-choice
task, a tiny LLM trained here that must beat chance, and named hub tasks skipped offline."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from dpa_core.errors import DPAInputError
from dpa_core.evaluation import BenchmarkSkipped, evaluate_lmeval, extract_language_model
from dpa_core.evaluation.lmeval import check_mcq_jsonl
from tests.tiny_models import CHATML, make_clip

TOWNS = ["marn", "oskel", "tibra", "vell"]
PEOPLE = ["bodak", "fimel", "garon", "kesul", "lutip", "mavor", "nezik", "pirad"]


def write_facts(path: Path, seed: int = 0) -> Path:
    """One four-choice question per person: where does <name> live? (the toy world's facts.jsonl format)."""
    rng = random.Random(seed)
    lines = []
    for i, name in enumerate(PEOPLE):
        choices = TOWNS[:]
        rng.shuffle(choices)
        lines.append(json.dumps({"id": f"fact-{i:04d}", "question": f"where does {name} live?", "choices": choices,
                                 "answer": choices.index(TOWNS[i % 4])}))
    path.write_text("\n".join(lines) + "\n")
    return path


def fact_texts() -> list[str]:
    return [f"where does {n} live? {TOWNS[i % 4]}" for i, n in enumerate(PEOPLE)]


def fact_tokenizer(out: Path):
    """Byte-level BPE trained on the fact texts: every word becomes one token, so sequences are short
    and training takes seconds (Qwen2's tokenizer class rebuilds a BPE from vocab + merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(fact_texts() * 10, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  unk_token="<unk>")
    tok.chat_template = CHATML  # build_llava needs one; the text task does not use it
    tok.save_pretrained(out)
    return tok


def train_fact_llm(out: Path, steps: int = 40, seed: int = 0) -> Path:
    """A tiny Qwen2 that memorises where each person lives, in the task's own prompt format
    (loss on the answer word only: the rest of the prompt is the same for everybody)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    tok = fact_tokenizer(out)
    batch = tok(fact_texts(), return_tensors="pt", padding=True)
    town_ids = torch.tensor([tok.encode(" " + t, add_special_tokens=False)[0] for t in TOWNS])
    labels = batch["input_ids"].masked_fill(~torch.isin(batch["input_ids"], town_ids), -100)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        model(**batch, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def fact_llm(tmp_path_factory) -> Path:
    return train_fact_llm(tmp_path_factory.mktemp("fact_llm"))


def test_extracted_llm_matches_llava(tiny_llava_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlavaForConditionalGeneration

    lm_dir = extract_language_model(tiny_llava_dir, tmp_path / "lm")
    lm = AutoModelForCausalLM.from_pretrained(lm_dir)
    llava = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir)
    assert type(lm).__name__ == "Qwen2ForCausalLM"
    assert json.loads((lm_dir / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    ids = AutoTokenizer.from_pretrained(lm_dir)("a red circle on the left", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(lm(ids).logits, llava(input_ids=ids).logits, atol=1e-5)
    assert not any("vision" in k for k in lm.state_dict())


def test_extract_rejects_non_llava(tiny_paths, tmp_path):
    with pytest.raises(DPAInputError, match="not a Llava checkpoint"):
        extract_language_model(tiny_paths["llm"], tmp_path / "lm")


def test_facts_jsonl_is_checked(tmp_path):
    assert check_mcq_jsonl(write_facts(tmp_path / "facts.jsonl")) == len(PEOPLE)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "question": "q", "choices": ["a", "b"], "answer": 2}) + "\n")
    with pytest.raises(DPAInputError, match="'answer' must be the index") as err:
        check_mcq_jsonl(bad)
    assert "'x'" in str(err.value)


def test_chat_prompt_and_sentence_choices(fact_llm_tokenizer_dir, tmp_path):
    """prompt "chat": the LLM's own chat template around the question, the reply scored right after
    the assistant header; choice_prefix/suffix make each choice a full answer sentence."""
    import yaml

    from dpa_core.evaluation.lmeval import write_mcq_task

    facts = tmp_path / "facts.jsonl"
    facts.write_text(json.dumps({"id": "f0", "question": "where does bodak live?", "choices": ["marn", "vell"],
                                 "answer": 1, "choice_prefix": "bodak lives in ", "choice_suffix": "."}) + "\n")
    task = write_mcq_task("text facts", facts, tmp_path / "tasks", prompt="chat", tokenizer_dir=fact_llm_tokenizer_dir)
    config = yaml.safe_load((tmp_path / "tasks" / f"{task}.yaml").read_text())
    assert task == "dpa_text_facts" and config["target_delimiter"] == ""
    assert config["doc_to_text"] == ("{% raw %}<|im_start|>user\n{% endraw %}{{question}}"
                                     "{% raw %}<|im_end|>\n<|im_start|>assistant\n{% endraw %}")
    data = [json.loads(x) for x in Path(config["dataset_kwargs"]["data_files"]["test"]).read_text().splitlines()]
    assert data[0]["choices"] == ["bodak lives in marn.", "bodak lives in vell."] and data[0]["answer"] == 1


def test_llava_llm_is_evaluated_in_memory(tiny_llava_dir, tmp_path, monkeypatch):
    """lm-eval gets the Llava checkpoint's LLM as a model instance: no copy of it is written."""
    import lm_eval
    from transformers import PreTrainedModel

    from dpa_core.evaluation.lmeval import load_causal_lm

    def no_save(*a, **k):
        raise AssertionError("a model was written to disk during evaluation")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", no_save)
    seen = []
    real = lm_eval.simple_evaluate
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda model, **kw: seen.append(model) or real(model=model, **kw))
    facts = write_facts(tmp_path / "facts.jsonl")
    metrics = evaluate_lmeval(tiny_llava_dir, tmp_path / "out", name="facts", path=facts, offline=True,
                              device="cpu", limit=4)
    assert 0.0 <= metrics["facts/acc"] <= 1.0 and metrics["meta/facts/n"] == 4
    hflm = seen[0]
    assert isinstance(hflm.model, PreTrainedModel) and not isinstance(hflm, str)
    assert type(hflm.model).__name__ == "Qwen2ForCausalLM"
    model, _ = load_causal_lm(tiny_llava_dir, "cpu")
    assert torch.equal(model.get_input_embeddings().weight, hflm.model.get_input_embeddings().weight)


@pytest.fixture
def fact_llm_tokenizer_dir(tmp_path) -> Path:
    fact_tokenizer(tmp_path / "tok")
    return tmp_path / "tok"


@pytest.mark.slow
def test_trained_llm_beats_chance(fact_llm, tmp_path):
    facts = write_facts(tmp_path / "facts.jsonl")
    metrics = evaluate_lmeval(fact_llm, tmp_path / "out", name="text_facts", path=facts, offline=True, device="cpu")
    assert metrics["text_facts/acc"] > 0.5  # chance is 0.25 with four choices
    assert metrics["meta/text_facts/n"] == len(PEOPLE)
    out = tmp_path / "out"
    assert json.loads((out / "scores.json").read_text()) == metrics
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == len(PEOPLE)
    assert samples[0]["arguments"][0] == ["where does bodak live?", f" {samples[0]['doc']['choices'][0]}"]


@pytest.mark.slow
def test_llava_llm_scores_like_its_base(fact_llm, tmp_path):
    """The same LLM inside a Llava checkpoint (built in memory at run time) scores exactly as the base LLM."""
    from dpa_core.modeling import build_llava, save_llava

    facts = write_facts(tmp_path / "facts.jsonl")
    llava_dir = save_llava(*build_llava(make_clip(tmp_path / "clip"), fact_llm), tmp_path / "llava")
    base = evaluate_lmeval(fact_llm, tmp_path / "base", name="facts", path=facts, offline=True, device="cpu")
    inside = evaluate_lmeval(llava_dir, tmp_path / "in", name="facts", path=facts, offline=True, device="cpu")
    assert inside["facts/acc"] == base["facts/acc"] and inside["facts/acc_norm"] == base["facts/acc_norm"]


@pytest.mark.slow
def test_hub_task_offline_is_skipped(fact_llm, tmp_path):
    with pytest.raises(BenchmarkSkipped, match="not available here"):
        evaluate_lmeval(fact_llm, tmp_path / "out", name="arc", task="arc_easy", offline=True, device="cpu")
    assert not (tmp_path / "out").exists()
